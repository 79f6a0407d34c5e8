"""The quick-start demo: its table and demo_results.json from recorded runs, the noise task's CSV, and one
small end-to-end run of both tasks, then served by one multi-task classifier."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter

import pytest
import soundfile as sf
import torch
from heard_noise import heard_noise
from transformers import ASTModel

from petl_apps import demo, demo_serve
from petl_apps.pretrain import PretrainSettings
from petl_apps.speech import GSC_COMMAND_WORDS, speaker_splits
from petl_modules import serve
from petl_modules.backbones.ast import FbankFrontEnd
from petl_modules.data.audiofolder import prepare_audiofolder
from petl_modules.multitask import MultiTaskClassifier

RECORDED = {  # method -> (trainable, backbone, valid accuracy, test accuracy, seconds)
    "linear_random_init": (2314, 1_840_000, 0.31, 0.295, 21.04),
    "lora": (39_178, 1_840_000, 0.93, 0.9166, 48.5),
}


def record_run(runs, method, trainable, backbone, valid, test, seconds):
    """A run folder as the GSC recipe and the demo leave it (only the keys the table reads, plus others)."""
    folder = runs / method
    folder.mkdir(parents=True)
    results = {
        "method": method,
        "parameters": {"trainable": trainable, "backbone": backbone, "trainable_percent": 100 * trainable / backbone},
        "mean": {"valid": {"loss": 1.0, "accuracy": valid}, "test": {"loss": 1.1, "accuracy": test}},
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / demo.RUN_INFO).write_text(json.dumps({"method": method, "train_seconds": seconds}))


def test_table_and_json_come_from_the_recorded_runs(tmp_path):
    for method, values in RECORDED.items():
        record_run(tmp_path, method, *values)
    rows = demo.collect_results(tmp_path, list(RECORDED))
    assert [list(row) for row in rows] == [list(demo.RESULT_KEYS)] * 2
    assert rows[1] == {
        "method": "lora",
        "trainable_params": 39_178,
        "trainable_percent": pytest.approx(2.12924, abs=1e-5),
        "valid_accuracy": 0.93,
        "test_accuracy": 0.9166,
        "train_seconds": 48.5,
    }
    table = demo.results_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [
        " method ",
        " trainable params ",
        " % of backbone ",
        " valid accuracy ",
        " test accuracy ",
        " training seconds ",
    ]
    assert table[2] == "| linear_random_init | 2,314 | 0.13 % | 0.310 | 0.295 | 21 |"
    assert table[3] == "| lora | 39,178 | 2.13 % | 0.930 | 0.917 | 48 |"


def test_an_unknown_method_is_named_before_any_work(tmp_path, capsys):
    assert demo.main([f"--output_folder={tmp_path}", "--methods=linear,lorra"]) == 1
    assert "recipes/GSC/hparams/lorra.yaml" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# Small speaker counts (80 clips) whose noises exercise every branch of `noise_csv`: with seed 3, the 20 train
# clips hold no white noise, which the valid and test clips hold (6 each: left out). Found in the clips' samples
# by `test_the_noise_csv_labels_the_words_clips_with_the_noise_they_hold`.
SMALL_SEED = 3
SMALL_SPEAKERS = {"train": 2, "valid": 3, "test": 3}
SMALL_CLIPS = {"train": 1, "valid": 1, "test": 1}
SMALL_CLASSES = ["brown_noise", "mains_hum", "none", "pink_noise"]
# The demo's own data (seed 0, `SPEAKERS`, `CLIPS_PER_SPEAKER`): the noise of each of its 800 clips, found in the
# samples of a full run's files (python -m petl_apps.demo --output_folder=/tmp/demo_full) by `heard_noise`.
DEMO_NOISES = {
    "train": {"brown_noise": 45, "mains_hum": 59, "none": 211, "pink_noise": 44, "white_noise": 41},
    "valid": {"brown_noise": 7, "mains_hum": 9, "none": 53, "pink_noise": 13, "white_noise": 18},
    "test": {"brown_noise": 38, "mains_hum": 36, "none": 135, "pink_noise": 53, "white_noise": 38},
}


def write_stamp(data_root, speakers, clips, seed):
    """A data root's `dataset.json` as `make_spoken_gsc` writes it (the keys `noise_csv` reads)."""
    data_root.mkdir(parents=True)
    settings = {"words": list(GSC_COMMAND_WORDS), "speakers": speakers, "clips_per_speaker": clips, "seed": seed}
    (data_root / "dataset.json").write_text(json.dumps(settings))


def read_rows(csv_file):
    with open(csv_file, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_noise_task_labels_every_clip_of_the_demos_speakers(tmp_path):
    """The demo's own speakers: every clip once, in its speaker's split, five classes, none left out, and per split
    the noises heard in a full run's clips (`DEMO_NOISES`); no clip is synthesised (a stamp alone)."""
    splits = speaker_splits(0)
    speakers = {split: splits[split][:count] for split, count in demo.SPEAKERS.items()}
    paths = demo.DemoPaths(tmp_path)
    write_stamp(paths.data / "speech_commands_v0.02", speakers, demo.CLIPS_PER_SPEAKER, 0)
    noises = demo.noise_csv(paths, paths.data / "speech_commands_v0.02")
    assert noises.classes == ["brown_noise", "mains_hum", "none", "pink_noise", "white_noise"]
    assert noises.left_out == {}
    assert {split: dict(sorted(counts.items())) for split, counts in noises.clips.items()} == DEMO_NOISES
    rows = read_rows(paths.data / "noise.csv")
    counts = {split: Counter(row["label"] for row in rows if row["split"] == split) for split in DEMO_NOISES}
    assert counts == DEMO_NOISES and len({row["path"] for row in rows}) == 20 * 2 * 10 + 10 * 10 + 30 * 10
    expected_paths = {
        f"speech_commands_v0.02/{word}/{hashlib.sha1(speaker.encode()).hexdigest()[:8]}_nohash_{index}.wav"
        for split in DEMO_NOISES
        for speaker in speakers[split]
        for word in GSC_COMMAND_WORDS
        for index in range(demo.CLIPS_PER_SPEAKER[split])
    }
    assert {row["path"] for row in rows} == expected_paths


def test_the_noise_csv_labels_the_words_clips_with_the_noise_they_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SPEAKERS", SMALL_SPEAKERS)
    monkeypatch.setattr(demo, "CLIPS_PER_SPEAKER", SMALL_CLIPS)
    paths = demo.DemoPaths(tmp_path)
    data_root = demo.make_data(paths, SMALL_SEED)
    noises = demo.noise_csv(paths, data_root)
    speakers = json.loads((data_root / "dataset.json").read_text())["speakers"]
    by_stem = {  # Speech Commands' file names: the speaker's SHA-1, its first 8 hex digits
        hashlib.sha1(speaker.encode()).hexdigest()[:8]: split for split, names in speakers.items() for speaker in names
    }
    sounds = {path.stem: sf.read(path)[0] for path in sorted((data_root / "_background_noise_").glob("*.wav"))}
    heard = {}  # every word clip of the data -> (split, the noise in its samples)
    for path in data_root.glob("[a-z]*/*.wav"):
        split = by_stem[path.name.split("_")[0]]
        heard[str(path.relative_to(data_root.parent))] = (split, heard_noise(sf.read(path)[0], sounds)[0])
    assert len(heard) == sum(SMALL_SPEAKERS.values()) * len(GSC_COMMAND_WORDS)
    trained = sorted({noise for split, noise in heard.values() if split == "train"})
    assert noises.classes == trained == SMALL_CLASSES
    rows = read_rows(tmp_path / "data" / "noise.csv")
    assert rows and list(rows[0]) == ["path", "label", "split"]
    assert {row["path"]: (row["split"], row["label"]) for row in rows} == {
        path: labels for path, labels in heard.items() if labels[1] in trained
    }
    assert len(rows) == len({row["path"] for row in rows})
    left_out = Counter((noise, split) for split, noise in heard.values() if noise not in trained)
    assert noises.left_out == {"white_noise": {"valid": 6, "test": 6}} and left_out == {
        ("white_noise", "valid"): 6,
        ("white_noise", "test"): 6,
    }
    # The AudioFolder recipe's own preparation takes it (it refuses a valid or test class without train items).
    manifests = prepare_audiofolder(tmp_path / "data", tmp_path / "manifests", csv_file="noise.csv")
    assert (manifests["train"].parent / "classes.txt").read_text().split() == SMALL_CLASSES


def test_demo_end_to_end_at_small_size_reuses_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPEAKERS", SMALL_SPEAKERS)
    monkeypatch.setattr(demo, "CLIPS_PER_SPEAKER", SMALL_CLIPS)
    monkeypatch.setattr(
        demo,
        "PRETRAIN",
        PretrainSettings(
            num_words=3, num_speakers=2, epochs=1, batch_size=4, hidden_size=32, num_layers=1, num_heads=2
        ),
    )
    argv = [f"--output_folder={tmp_path}", "--methods=linear_random_init,linear", "--epochs=1", f"--seed={SMALL_SEED}"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "SMALL SYNTHETIC DEMO" in out and "MIT/ast-finetuned-audioset-10-10-0.4593" in out
    rows = json.loads((tmp_path / "demo_results.json").read_text())
    assert [row["method"] for row in rows] == ["linear_random_init", "linear"]
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"]  # same architecture, same head
    assert all(0.0 <= row["test_accuracy"] <= 1.0 and row["train_seconds"] > 0 for row in rows)
    assert (tmp_path / "demo_results.md").read_text().count("\n| linear") == 2
    run = tmp_path / "runs" / "linear_random_init"
    assert "linear_random_init" in (run / "hyperparams.yaml").read_text()
    assert (run / "demo_recipe.log").is_file() and (tmp_path / "report" / "accuracy_vs_params.png").is_file()

    assert_linear_probed_the_pretrained_weights(tmp_path)

    noise = json.loads((tmp_path / "demo_noise.json").read_text())
    assert noise["task"] == "noise" and noise["method"] == "lora" == demo.NOISE_METHOD
    assert noise["classes"] == SMALL_CLASSES and 0.0 <= noise["test_accuracy"] <= 1.0
    assert {key: noise[key] for key in demo.RESULT_KEYS} == demo.collect_results(tmp_path / "noise_runs", ["lora"])[0]
    test_labels = Counter(row["label"] for row in read_rows(tmp_path / "data" / "noise.csv") if row["split"] == "test")
    assert noise["clips"]["test"] == sum(test_labels.values()) == 30 - 6
    assert noise["majority_test_accuracy"] == round(max(test_labels.values()) / sum(test_labels.values()), 4)
    assert noise["left_out"] == {"white_noise": {"valid": 6, "test": 6}}
    md = (tmp_path / "demo_results.md").read_text()
    assert "Second task, the background noise" in out and "\n| lora |" in md
    assert f"most frequent test class {noise['majority_test_accuracy']:.3f}" in md
    assert "a uniform guess scores 0.250" in md and "white_noise (6 valid, 6 test)" in md
    assert not (tmp_path / "runs" / "lora").exists()  # the words task's runs (and report) stay its own
    assert_both_tasks_serve_on_one_backbone(tmp_path, monkeypatch)

    stamps = [(folder / demo.RUN_INFO).stat().st_mtime_ns for folder in (run, tmp_path / "noise_runs" / "lora")]
    assert demo.main(argv) == 0
    assert [(folder / demo.RUN_INFO).stat().st_mtime_ns for folder in (run, tmp_path / "noise_runs" / "lora")] == stamps
    assert json.loads((tmp_path / "demo_results.json").read_text()) == rows
    assert json.loads((tmp_path / "demo_noise.json").read_text()) == noise


def assert_both_tasks_serve_on_one_backbone(output, monkeypatch):
    """`make serve`'s tasks (linear: the shared words run here) load into one classifier, in ONE input group."""
    served = []
    monkeypatch.setattr(serve, "main", served.append)
    assert demo_serve.main([f"--output_folder={output}"]) == 0
    words, noise = output / "runs" / "linear", output / "noise_runs" / "lora"
    assert served == [["--task", f"words={words}", "--task", f"noise={noise}"]]
    classifier = MultiTaskClassifier("cpu")
    classifier.add_task("words", words)
    classifier.add_task("noise", noise)
    assert len(classifier.backbones) == 1  # one backbone forward for a batch mixing both tasks
    assert classifier.tasks["noise"].classes == SMALL_CLASSES
    assert sorted(classifier.tasks["words"].classes) == sorted(GSC_COMMAND_WORDS)
    wav = torch.from_numpy(sf.read(next((output / "data" / "speech_commands_v0.02" / "yes").glob("*.wav")))[0])
    wavs = torch.stack([wav, wav]).float()
    probabilities = classifier.class_probabilities(wavs, torch.ones(2), ["words", "noise"])
    assert [tuple(p.shape) for p in probabilities] == [(10,), (len(SMALL_CLASSES),)]
    assert all(torch.isclose(p.sum(), torch.tensor(1.0)) for p in probabilities)


def assert_linear_probed_the_pretrained_weights(output):
    """`linear`'s embedding cache holds the PRETRAINED AST's vectors, computed here with transformers alone.

    The control has its own: both runs name the same --backbone_source, once the cache's whole key, so the
    control (run first) cached its random-weight vectors where `linear` then read them. Now the key digests
    the weights: two caches, and exactly one holds the pretrained AST's vectors.
    """
    caches = {
        path.parent: json.loads(path.read_text()) for path in (output / "feature_cache").glob("*/*/settings.json")
    }
    embeddings = {
        folder: key for folder, key in caches.items() if key.get("features") == "pooled_normalised_last_layer"
    }
    assert len({key["weights"] for key in embeddings.values()}) == len(embeddings) == 2
    backbone = output / "backbone_ast_pretrained"
    preprocessor = json.loads((backbone / "preprocessor_config.json").read_text())
    front_end = FbankFrontEnd(100, 128, mean=preprocessor["mean"], std=preprocessor["std"])
    ast = ASTModel.from_pretrained(backbone).eval()
    wavs = sorted((output / "data" / "speech_commands_v0.02").glob("[a-z]*/*.wav"))
    fbank = torch.stack([front_end.single(torch.from_numpy(sf.read(wav, dtype="float32")[0])) for wav in wavs])
    with torch.no_grad():
        last = ast(fbank, output_hidden_states=True).hidden_states[-1]
    expected = torch.nn.functional.layer_norm(last, last.shape[-1:], eps=ast.config.layer_norm_eps).mean(dim=1)
    matches = []
    for folder in embeddings:
        cached = torch.stack([torch.load(path, weights_only=True) for path in sorted(folder.glob("*.pt"))])
        assert len(cached) == len(expected) == sum(SMALL_SPEAKERS.values()) * len(GSC_COMMAND_WORDS)
        # The cache's file names hash paths: match vectors instead (exact distances, not the matmul shortcut).
        distance = torch.cdist(expected, cached, compute_mode="donot_use_mm_for_euclid_dist")
        matches.append(bool(distance.min(dim=1).values.max() < 1e-4))
    assert sorted(matches) == [False, True]
