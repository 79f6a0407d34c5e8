"""The quick-start demo: its table and demo_results.json from recorded runs, the accent task's CSV, and one
small end-to-end run of both tasks, then served by one multi-task classifier."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import soundfile as sf
import torch
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


# The smallest speaker counts whose first speakers share accents between the three splits: with seed 113, the
# 2 train speakers' accents (en-gb-x-rp, en-us) both have speakers among the first 3 of valid and of test,
# which also hold accents the train speakers lack (left out).
SMALL_SEED = 113
SMALL_SPEAKERS = {"train": 2, "valid": 3, "test": 3}
SMALL_CLIPS = {"train": 1, "valid": 1, "test": 1}


def write_stamp(data_root, speakers, clips):
    """A data root's `dataset.json` as `make_spoken_gsc` writes it (the keys `accent_csv` reads)."""
    data_root.mkdir(parents=True)
    settings = {"words": list(GSC_COMMAND_WORDS), "speakers": speakers, "clips_per_speaker": clips}
    (data_root / "dataset.json").write_text(json.dumps(settings))


def read_rows(csv_file):
    with open(csv_file, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_accent_task_keeps_the_accents_of_every_split_on_the_demos_speakers(tmp_path):
    """The demo's own speakers (seed 0, `SPEAKERS`): 6 of the 8 accents have speakers in train, valid and test
    (counted once from `speaker_splits(0)` with a Counter of the voices); the other two's valid and test clips are
    left out."""
    splits = speaker_splits(0)
    speakers = {split: splits[split][:count] for split, count in demo.SPEAKERS.items()}
    paths = demo.DemoPaths(tmp_path)
    write_stamp(paths.data / "speech_commands_v0.02", speakers, demo.CLIPS_PER_SPEAKER)
    accents = demo.accent_csv(paths, paths.data / "speech_commands_v0.02")
    expected = ["en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-us"]
    assert accents.classes == expected
    assert accents.left_out == {"en-gb-x-gbcwmd": {"valid": 2, "test": 3}, "en-us-nyc": {"test": 5}}
    rows = read_rows(paths.data / "accents.csv")
    counts = {split: sum(row["split"] == split for row in rows) for split in ("train", "valid", "test")}
    assert counts == {"train": 20 * 2 * 10, "valid": (10 - 2) * 10, "test": (30 - 3 - 5) * 10}
    assert {row["label"] for row in rows} == set(expected)


def test_the_accent_csv_labels_the_words_clips_with_their_speakers_voices(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SPEAKERS", SMALL_SPEAKERS)
    monkeypatch.setattr(demo, "CLIPS_PER_SPEAKER", SMALL_CLIPS)
    paths = demo.DemoPaths(tmp_path)
    data_root = demo.make_data(paths, SMALL_SEED)
    accents = demo.accent_csv(paths, data_root)
    speakers = json.loads((data_root / "dataset.json").read_text())["speakers"]
    by_stem = {  # Speech Commands' file names: the speaker's SHA-1, its first 8 hex digits
        hashlib.sha1(speaker.encode()).hexdigest()[:8]: (speaker, split)
        for split, names in speakers.items()
        for speaker in names
    }
    rows = read_rows(tmp_path / "data" / "accents.csv")
    assert rows and list(rows[0]) == ["path", "label", "split"]
    for row in rows:
        assert (tmp_path / "data" / row["path"]).is_file(), row["path"]
        speaker, split = by_stem[row["path"].split("/")[-1].split("_")[0]]
        assert (row["label"], row["split"]) == (speaker.split("+")[0], split)
    labels = {split: {row["label"] for row in rows if row["split"] == split} for split in ("train", "valid", "test")}
    assert labels["train"] == labels["valid"] == labels["test"] == set(accents.classes) == {"en-gb-x-rp", "en-us"}
    used = {split: {by_stem[row["path"].split("/")[-1].split("_")[0]][0] for row in rows if row["split"] == split}
            for split in labels}  # fmt: skip
    assert not (used["train"] & used["valid"] or used["train"] & used["test"] or used["valid"] & used["test"])
    # Every clip of every kept speaker, once; the left-out accents' speakers have none.
    kept = [s for split in speakers for s in speakers[split] if s.split("+")[0] in accents.classes]
    assert len(rows) == len({row["path"] for row in rows}) == len(kept) * len(GSC_COMMAND_WORDS)
    assert sum(n for counts in accents.left_out.values() for n in counts.values()) == sum(
        SMALL_SPEAKERS.values()
    ) - len(kept)
    # The AudioFolder recipe's own preparation takes it (it refuses a valid or test class without train items).
    manifests = prepare_audiofolder(tmp_path / "data", tmp_path / "manifests", csv_file="accents.csv")
    assert (manifests["train"].parent / "classes.txt").read_text().split() == ["en-gb-x-rp", "en-us"]


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

    accent = json.loads((tmp_path / "demo_accent.json").read_text())
    assert accent["task"] == "accent" and accent["method"] == "lora" == demo.ACCENT_METHOD
    assert accent["classes"] == ["en-gb-x-rp", "en-us"] and 0.0 <= accent["test_accuracy"] <= 1.0
    assert {key: accent[key] for key in demo.RESULT_KEYS} == demo.collect_results(tmp_path / "accent_runs", ["lora"])[0]
    assert "Second task, the speaker's accent" in out and "\n| lora |" in (tmp_path / "demo_results.md").read_text()
    assert not (tmp_path / "runs" / "lora").exists()  # the words task's runs (and report) stay its own
    assert_both_tasks_serve_on_one_backbone(tmp_path, monkeypatch)

    stamps = [(folder / demo.RUN_INFO).stat().st_mtime_ns for folder in (run, tmp_path / "accent_runs" / "lora")]
    assert demo.main(argv) == 0
    assert [
        (folder / demo.RUN_INFO).stat().st_mtime_ns for folder in (run, tmp_path / "accent_runs" / "lora")
    ] == stamps
    assert json.loads((tmp_path / "demo_results.json").read_text()) == rows
    assert json.loads((tmp_path / "demo_accent.json").read_text()) == accent


def assert_both_tasks_serve_on_one_backbone(output, monkeypatch):
    """`make serve`'s tasks (linear: the shared words run here) load into one classifier, in ONE input group."""
    served = []
    monkeypatch.setattr(serve, "main", served.append)
    assert demo_serve.main([f"--output_folder={output}"]) == 0
    words, accent = output / "runs" / "linear", output / "accent_runs" / "lora"
    assert served == [["--task", f"words={words}", "--task", f"accent={accent}"]]
    classifier = MultiTaskClassifier("cpu")
    classifier.add_task("words", words)
    classifier.add_task("accent", accent)
    assert len(classifier.backbones) == 1  # one backbone forward for a batch mixing both tasks
    assert classifier.tasks["accent"].classes == ["en-gb-x-rp", "en-us"]
    assert sorted(classifier.tasks["words"].classes) == sorted(GSC_COMMAND_WORDS)
    wav = torch.from_numpy(sf.read(next((output / "data" / "speech_commands_v0.02" / "yes").glob("*.wav")))[0])
    wavs = torch.stack([wav, wav]).float()
    probabilities = classifier.class_probabilities(wavs, torch.ones(2), ["words", "accent"])
    assert [tuple(p.shape) for p in probabilities] == [(10,), (2,)]
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
