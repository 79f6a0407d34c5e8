"""Prediction on new audio: `AudioClassifier` and `python -m petl_modules.classify` against the recipes' test stage.

The runs are tiny GSC runs trained through the recipe's command line (tests/trained_runs.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from trained_runs import ENV, check_equals_test_stage, manifest_items, trained_run

from petl_modules import classify
from petl_modules.data import read_audio
from petl_modules.inference import AudioClassifier, window_starts
from petl_modules.run_folder import InferenceError, locate_run

METHODS = ("lora", "conformer_adapter")  # LoRA; an adapter with BatchNorm statistics in its state


@pytest.fixture(scope="module", params=METHODS)
def run(request, tmp_path_factory):
    return trained_run(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "lora")


def test_classify_equals_the_recipe_test_stage(run, capsys):
    files = [path for path, _ in manifest_items(run)]
    records = classify.main(["--run", str(run), *files, "--top_k", "4", "--json"])
    assert json.loads(capsys.readouterr().out) == records
    check_equals_test_stage(records, run)


def test_output_folder_with_one_fold_and_with_several(lora_run, tmp_path):
    """`--run` takes an output folder whose single run is fold<k>/; several runs ask to pick one."""
    output = tmp_path / "esc_like"
    shutil.copytree(lora_run, output / "fold3")
    (output / "fold3" / "fold_result.json").unlink()  # classes then come from <output>/results.json
    results = json.loads((lora_run / "results.json").read_text())
    results["folds"] = {"3": results["folds"]["official"]}
    (output / "results.json").write_text(json.dumps(results))
    located = locate_run(output)
    assert located.folder == output / "fold3"
    assert located.classes == results["folds"]["3"]["classes"]
    assert located.checkpoint.parent.parent == output / "fold3" / "save"
    shutil.copytree(output / "fold3", output / "fold4")
    with pytest.raises(InferenceError, match=r"holds 2 runs \(fold3, fold4\); pass one"):
        locate_run(output)


@pytest.mark.parametrize(
    ("num_samples", "window", "hop", "expected"),
    [
        (10, 4, 2, [0, 2, 4, 6]),  # the last window ends exactly at the end
        (11, 4, 2, [0, 2, 4, 6, 7]),  # one more window, ending at the last sample
        (4, 4, 2, [0]),
        (3, 4, 2, [0]),  # shorter than a window: the whole file once
        (9, 3, 3, [0, 3, 6]),
    ],
)
def test_window_starts(num_samples, window, hop, expected):
    starts = window_starts(num_samples, window, hop)
    assert starts == expected
    assert all(start + min(window, num_samples) <= num_samples for start in starts)


@pytest.fixture(scope="module")
def classifier(lora_run):
    return AudioClassifier.from_hparams(source=str(lora_run), run_opts={"device": "cpu"})


def test_sliding_windows_average_the_window_probabilities(classifier, lora_run):
    path = manifest_items(lora_run)[0][0]
    wav = read_audio(path)
    window, hop = 4000, 2400  # 0.25 s and 0.15 s at 16 kHz
    starts = list(range(0, wav.shape[0] - window + 1, hop))
    if starts[-1] + window < wav.shape[0]:
        starts.append(wav.shape[0] - window)
    expected = torch.stack([classifier.class_probabilities(wav[s : s + window])[0] for s in starts]).mean(dim=0)
    result = classifier.classify_file(path, top_k=2, window_seconds=0.25, hop_seconds=0.15)
    torch.testing.assert_close(result.probabilities[0], expected)
    assert result.labels[0] == classifier.classes[int(expected.argmax())]
    assert [label for label, _ in result.top_k[0]] == [classifier.classes[i] for i in expected.topk(2).indices]
    # A window longer than the file is the file itself.
    whole = classifier.classify_file(path, window_seconds=wav.shape[0] / 16000 + 1)
    torch.testing.assert_close(whole.probabilities, classifier.classify_file(path).probabilities)


def test_any_rate_depth_and_channel_count(classifier, lora_run, tmp_path):
    path = manifest_items(lora_run)[0][0]
    wav = read_audio(path).numpy()
    stereo = tmp_path / "stereo24.wav"
    sf.write(stereo, np.stack([wav, wav], axis=1), 16000, subtype="PCM_24")
    reference = classifier.classify_file(path).probabilities
    torch.testing.assert_close(classifier.classify_file(stereo).probabilities, reference, atol=1e-5, rtol=0)
    resampled = tmp_path / "44k1_float.wav"
    sf.write(resampled, np.interp(np.arange(0, len(wav), 16000 / 44100), np.arange(len(wav)), wav), 44100, "FLOAT")
    probabilities = classifier.classify_file(resampled).probabilities
    assert probabilities.shape == reference.shape and float(probabilities.sum()) == pytest.approx(1.0)


def test_classify_batch_with_padding_scores_each_file_as_alone(classifier, lora_run):
    """AST crops each item's fbank at its own length: a padded batch scores as the files one by one."""
    wavs = [read_audio(path) for path, _ in manifest_items(lora_run)[:3]]
    wavs[1] = wavs[1][: len(wavs[1]) // 2]  # one shorter item, so the batch is padded
    longest = max(len(wav) for wav in wavs)
    batch = torch.stack([torch.nn.functional.pad(wav, (0, longest - len(wav))) for wav in wavs])
    lengths = torch.tensor([len(wav) / longest for wav in wavs])
    result = classifier.classify_batch(batch, lengths, top_k=1)
    alone = torch.cat([classifier.classify_batch(wav).probabilities for wav in wavs])
    torch.testing.assert_close(result.probabilities, alone, atol=1e-6, rtol=1e-5)
    assert result.labels == [classifier.classes[i] for i in alone.argmax(dim=1)]
    assert len(result.top_k[0]) == 1 and result.top_k[0][0][0] == result.labels[0]


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        classify.main(argv)
    message = str(stop.value.code)
    assert message.startswith("classify: error: ") and "\n" not in message
    return message


def test_bad_input_is_one_line(lora_run, tmp_path):
    audio = manifest_items(lora_run)[0][0]
    assert "folder not found" in one_line_error(["--run", str(tmp_path / "nowhere"), audio])
    assert "no run here" in one_line_error(["--run", str(tmp_path), audio])
    assert "audio file not found" in one_line_error(["--run", str(lora_run), str(tmp_path / "missing.wav")])
    message = one_line_error(["--run", str(lora_run), audio, "--window_seconds", "-1"])
    assert "window_seconds must be a positive number" in message


def test_python_dash_m_classify(lora_run):
    audio = manifest_items(lora_run)[0][0]
    done = subprocess.run(
        [sys.executable, "-m", "petl_modules.classify", "--run", str(lora_run), audio, "--top_k", "2"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"{audio}: ") and len(lines) == 3
