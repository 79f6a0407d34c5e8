"""Your own data (recipes/AudioFolder): class folders and CSV layouts, split lists, the seeded stratified split,
few-shot, reuse, one-line errors, and the recipe end to end through its command line."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
from recipe_helpers import METHODS, QUICK_OPTIONS, run_recipes

from petl_apps.commands import recipe_command
from petl_apps.synthetic import make_audiofolder
from petl_modules.data import DataPreparationError, read_classes, read_manifest
from petl_modules.data.audiofolder import prepare_audiofolder, stratified_split
from petl_modules.data.manifest import OPTIONS_FILE

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "AudioFolder"
SPLITS = ("train", "valid", "test")


def manifests(folder: Path) -> dict[str, list[dict[str, str]]]:
    return {split: read_manifest(folder / f"{split}.csv") for split in SPLITS}


def labels_per_split(rows: dict[str, list[dict[str, str]]]) -> dict[str, Counter]:
    return {split: Counter(row["label"] for row in split_rows) for split, split_rows in rows.items()}


# ------------------------------------------------------------------------------------------ stratified split


def expected_count(fraction: float, n: int) -> int:
    """The documented closed form: round half up, at least one."""
    return max(1, int(fraction * n + 0.5))


@pytest.mark.parametrize("fractions", [{"valid": 0.1, "test": 0.2}, {"valid": 0.25, "test": 0.25}, {"test": 0.3}])
def test_stratified_split_counts_follow_the_closed_form(fractions):
    sizes = {"a": 10, "b": 3, "c": 7, "d": 41}
    labels = {f"{label}{i:02d}": label for label, n in sizes.items() for i in range(n)}
    splits = stratified_split(labels, fractions, seed=3)
    assert set(splits) == {"train", *fractions}
    every = [uid for uids in splits.values() for uid in uids]
    assert sorted(every) == sorted(labels) and len(every) == len(set(every))  # a partition
    for label, n in sizes.items():
        counts = {split: sum(labels[uid] == label for uid in uids) for split, uids in splits.items()}
        for split, fraction in fractions.items():
            assert counts[split] == expected_count(fraction, n)
        assert counts["train"] == n - sum(expected_count(f, n) for f in fractions.values()) >= 1


def test_stratified_split_depends_on_the_set_and_seed_only():
    labels = {f"x{i:03d}": "xyz"[i % 3] for i in range(60)}
    shuffled = list(labels.items())
    random.Random(0).shuffle(shuffled)
    fractions = {"valid": 0.1, "test": 0.1}
    assert stratified_split(dict(shuffled), fractions, 5) == stratified_split(labels, fractions, 5)
    assert stratified_split(labels, fractions, 5) != stratified_split(labels, fractions, 6)


def test_stratified_split_names_a_class_too_small():
    labels = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b"}
    with pytest.raises(DataPreparationError, match=r"class 'b' has 2 item\(s\)"):
        stratified_split(labels, {"valid": 0.1, "test": 0.1}, 0)


# ------------------------------------------------------------------------------------------ layouts


def test_class_folders(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=3, n_per_class=6, extensions=("wav", "flac", "ogg", "mp3"))
    (root / "sound_0" / "notes.txt").write_text("not audio\n")
    (root / "sound_1" / ".hidden").mkdir()
    sf.write(root / "sound_1" / ".hidden" / "x.wav", [0.0] * 100, 16000)
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("readme\n")
    paths = prepare_audiofolder(root, tmp_path / "prep")
    rows = manifests(tmp_path / "prep")
    assert paths == {split: tmp_path / "prep" / f"{split}.csv" for split in SPLITS}
    # every audio file once, labelled by its folder, with the duration soundfile reads
    on_disk = {str(p) for ext in ("wav", "flac", "ogg", "mp3") for p in root.glob(f"sound_*/*.{ext}")}
    listed = [row["wav"] for split_rows in rows.values() for row in split_rows]
    assert sorted(listed) == sorted(on_disk) and len(on_disk) == 18
    for row in (row for split_rows in rows.values() for row in split_rows):
        assert row["label"] == Path(row["wav"]).parent.name
        info = sf.info(row["wav"])
        assert float(row["duration"]) == pytest.approx(info.frames / info.samplerate)
    assert read_classes(tmp_path / "prep" / "classes.txt") == ["sound_0", "sound_1", "sound_2"]
    per_split = labels_per_split(rows)  # 6 per class: 1 valid, 1 test, 4 train
    assert all(per_split[split] == {f"sound_{c}": n for c in range(3)} for split, n in (("train", 4), ("valid", 1)))


@pytest.mark.parametrize("extension", ["wav", "flac", "ogg", "mp3"])
def test_every_audio_format_reads_at_16k(tmp_path, extension):
    from petl_modules.data import read_audio

    root = make_audiofolder(tmp_path / "data", num_classes=1, n_per_class=3, extensions=(extension,))
    prepare_audiofolder(root, tmp_path / "prep", valid_fraction=0.3, test_fraction=0.3)
    for row in read_manifest(tmp_path / "prep" / "train.csv"):
        assert read_audio(row["wav"]).shape[0] == pytest.approx(16000 * float(row["duration"]), abs=2)


def test_csv_with_split_column_is_followed_exactly(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=3, n_per_class=5, layout="csv_split")
    prepare_audiofolder(root, tmp_path / "prep", csv_file="labels.csv")
    with open(root / "labels.csv", newline="") as handle:
        expected = {(str(root / row["path"]), row["label"], row["split"]) for row in csv.DictReader(handle)}
    got = {(row["wav"], row["label"], split) for split, rows in manifests(tmp_path / "prep").items() for row in rows}
    assert got == expected


def test_csv_without_split_column_and_with_split_lists(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=2, n_per_class=5, layout="csv")
    (root / "valid.txt").write_text("audio/0_1.flac\naudio/1_1.wav\n\n")
    (root / "lists").mkdir()
    (root / "lists" / "test.txt").write_text("./audio/0_2.ogg\naudio/1_2.flac\n")
    prepare_audiofolder(
        root, tmp_path / "prep", csv_file="labels.csv", valid_list="valid.txt", test_list="lists/test.txt"
    )
    rows = manifests(tmp_path / "prep")
    relative = {split: sorted(Path(row["wav"]).relative_to(root).as_posix() for row in rows[split]) for split in rows}
    assert relative["valid"] == ["audio/0_1.flac", "audio/1_1.wav"]
    assert relative["test"] == ["audio/0_2.ogg", "audio/1_2.flac"]
    assert len(relative["train"]) == 6


def test_one_list_and_a_drawn_split(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=2, n_per_class=10)
    (root / "test.txt").write_text("sound_0/clip0.wav\nsound_1/clip1.ogg\n")
    prepare_audiofolder(root, tmp_path / "prep", test_list="test.txt", valid_fraction=0.2)
    per_split = labels_per_split(manifests(tmp_path / "prep"))
    assert per_split["test"] == {"sound_0": 1, "sound_1": 1}
    assert per_split["valid"] == {"sound_0": 2, "sound_1": 2}  # 0.2 of the 9 unlisted items, rounded
    assert per_split["train"] == {"sound_0": 7, "sound_1": 7}


def test_few_shot_keeps_k_per_class_in_train_only(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=3, n_per_class=8)
    prepare_audiofolder(root, tmp_path / "full")
    prepare_audiofolder(root, tmp_path / "few", few_shot_samples=2, seed=4)
    full, few = manifests(tmp_path / "full"), manifests(tmp_path / "few")
    assert labels_per_split(few)["train"] == {f"sound_{c}": 2 for c in range(3)}
    assert {row["ID"] for row in few["train"]} <= {row["ID"] for row in full["train"]}
    assert few["valid"] == full["valid"] and few["test"] == full["test"]


def test_split_seed_is_not_the_training_seed(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=2, n_per_class=10)
    prepare_audiofolder(root, tmp_path / "a", seed=1)
    prepare_audiofolder(root, tmp_path / "b", seed=2)
    prepare_audiofolder(root, tmp_path / "c", split_seed=7)
    assert manifests(tmp_path / "a") == manifests(tmp_path / "b")  # same test set for every training seed
    assert manifests(tmp_path / "a")["test"] != manifests(tmp_path / "c")["test"]


def test_reused_until_the_data_changes(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=2, n_per_class=5)
    prepare_audiofolder(root, tmp_path / "prep")
    options = tmp_path / "prep" / OPTIONS_FILE
    first = options.stat().st_mtime_ns
    prepare_audiofolder(root, tmp_path / "prep")
    assert options.stat().st_mtime_ns == first
    sf.write(root / "sound_1" / "extra.wav", [0.1] * 4000, 16000)
    prepare_audiofolder(root, tmp_path / "prep")
    assert sum(len(rows) for rows in manifests(tmp_path / "prep").values()) == 11
    assert json.loads(options.read_text())["options"]["valid_fraction"] == 0.1


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


ERRORS = {
    "empty class folder": (lambda root: (root / "sound_9").mkdir(), {}, r"class folder .*sound_9 holds no audio"),
    "no class folder": (None, {}, r"no class folders in"),
    "missing csv": (None, {"csv_file": "nope.csv"}, r"nope.csv not found"),
    "csv lacks label": (lambda root: _write(root / "l.csv", "path,class\na.wav,x\n"), {"csv_file": "l.csv"}, "label"),
    "bad split value": (
        lambda root: _write(root / "l.csv", "path,label,split\nsound_0/clip0.wav,a,training\n"),
        {"csv_file": "l.csv"},
        r"line 2: split 'training' is not train",
    ),
    "csv path outside": (
        lambda root: _write(root / "l.csv", "path,label\n../x.wav,a\n"),
        {"csv_file": "l.csv"},
        r"line 2: path '../x.wav' must be relative",
    ),
    "csv duplicate": (
        lambda root: _write(root / "l.csv", "path,label\nsound_0/clip0.wav,a\nsound_0/clip0.wav,b\n"),
        {"csv_file": "l.csv"},
        r"line 3: 'sound_0/clip0.wav' is listed again \(first on line 2\)",
    ),
    "csv missing audio": (
        lambda root: _write(
            root / "l.csv", "path,label,split\na.wav,a,train\nsound_0/clip0.wav,a,valid\nsound_0/clip1.flac,a,test\n"
        ),
        {"csv_file": "l.csv"},
        r"audio file .*a.wav listed in .*l.csv not found",
    ),
    "class without training item": (
        lambda root: _write(
            root / "l.csv",
            "path,label,split\nsound_0/clip0.wav,a,train\nsound_0/clip1.flac,b,valid\nsound_0/clip2.ogg,a,test\n",
        ),
        {"csv_file": "l.csv"},
        r"class 'b' is in valid but has no training item",
    ),
    "unknown list entry": (
        lambda root: _write(root / "t.txt", "sound_0/nope.wav\n"),
        {"test_list": "t.txt"},
        r"--test_list: .*t.txt lists 'sound_0/nope.wav'",
    ),
    "both lists share": (
        lambda root: (_write(root / "v.txt", "sound_0/clip0.wav\n"), _write(root / "t.txt", "sound_0/clip0.wav\n")),
        {"valid_list": "v.txt", "test_list": "t.txt"},
        r"in both --valid_list and --test_list",
    ),
    "bad fraction": (None, {"valid_fraction": 1.5}, r"--valid_fraction must be a number between 0 and 1"),
    "fractions too large": (None, {"valid_fraction": 0.5, "test_fraction": 0.5}, r"must be below 1"),
    "class too small": (lambda root: _write(root / "sound_9" / "a.wav", ""), {}, r"class 'sound_9' has 1 item"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_one_line_errors(tmp_path, case):
    edit, options, message = ERRORS[case]
    root = tmp_path / "data"
    if case == "no class folder":
        _write(root / "only_a_file.wav", "")
    else:
        make_audiofolder(root, num_classes=1, n_per_class=4)
    if edit is not None:
        edit(root)
    with pytest.raises(DataPreparationError, match=message) as error:
        prepare_audiofolder(root, tmp_path / "prep", **options)
    assert "\n" not in str(error.value) and str(error.value).startswith("AudioFolder: ")


def test_prepare_script_command_line(tmp_path):
    root = make_audiofolder(tmp_path / "data", num_classes=2, n_per_class=5, layout="csv")
    out = subprocess.run(
        [sys.executable, str(RECIPE / "audiofolder_prepare.py"), str(root), str(tmp_path / "prep")]
        + ["--csv_file", "labels.csv", "--test_fraction", "0.2", "--few_shot_samples", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    assert out.stdout.splitlines() == [f"{split}: {tmp_path / 'prep' / split}.csv" for split in SPLITS]
    assert labels_per_split(manifests(tmp_path / "prep"))["test"] == {"sound_0": 1, "sound_1": 1}


# ------------------------------------------------------------------------------------------ the recipe end to end
# recipes/AudioFolder/train.py through its command line, on generated data and the tiny AST / Wav2Vec2
# checkpoints: no --num_classes anywhere, the class count comes from the data.

# layout -> (make_audiofolder options, recipe options, files the layout adds); class counts differ on purpose
LAYOUTS = {
    "folders": ({"num_classes": 3, "layout": "folders"}, [], {}),
    "csv": ({"num_classes": 4, "layout": "csv"}, ["--csv_file=labels.csv"], {}),
    "csv_split": ({"num_classes": 2, "layout": "csv_split"}, ["--csv_file=labels.csv"], {}),
    "csv_lists": (
        {"num_classes": 2, "layout": "csv"},
        ["--csv_file=labels.csv", "--valid_list=valid.txt", "--test_list=lists/test.txt"],
        {
            "valid.txt": "audio/0_0.wav\naudio/1_0.ogg\n",
            "lists/test.txt": "audio/0_4.flac\naudio/1_3.ogg\naudio/1_4.wav\n",
        },
    ),
}
N_PER_CLASS = 5


def make_layout(root: Path, layout: str) -> Path:
    options, _, files = LAYOUTS[layout]
    make_audiofolder(root, n_per_class=N_PER_CLASS, **options)
    for name, text in files.items():
        _write(root / name, text)
    return root


def expected_test_items(root: Path, layout: str) -> Counter:
    """The test set each layout documents, as relative paths (lists, split column) or labels (drawn split)."""
    if layout == "csv_split":
        with open(root / "labels.csv", newline="") as handle:
            return Counter(row["path"] for row in csv.DictReader(handle) if row["split"] == "test")
    if layout == "csv_lists":
        return Counter(LAYOUTS[layout][2]["lists/test.txt"].split())
    # drawn: per class round(0.1 x 5) but at least one item
    return Counter({f"sound_{c}": expected_count(0.1, N_PER_CLASS) for c in range(LAYOUTS[layout][0]["num_classes"])})


def quick_args(method: str, root: Path, output: Path, checkpoints: dict[str, Path], *extra: str) -> list[str]:
    """A quick tiny run's arguments after `train.py` (1 epoch, batch 4, AST unless `extra` says
    --backbone=wav2vec2): no --num_classes."""
    backbone = next((arg.split("=", 1)[1] for arg in extra if arg.startswith("--backbone=")), "ast")
    settings = {"data_folder": root, "output_folder": output, "backbone_source": checkpoints[backbone]}
    return recipe_command("AudioFolder", method, settings, *QUICK_OPTIONS, *extra, recipes=REPO / "recipes")[2:]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from petl_modules.random_backbones import write_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: write_random_checkpoint(kind, root / kind) for kind in ("ast", "wav2vec2")}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, checkpoints) -> dict[str, tuple[Path, Path, dict]]:
    """Every layout (LoRA), few-shot, Wav2Vec2, two bad commands, in one interpreter: name -> (data, out, outcome)."""
    root = tmp_path_factory.mktemp("audiofolder_runs")
    runs = {}
    for layout in LAYOUTS:
        runs[layout] = ("lora", make_layout(root / "data" / layout, layout), [*LAYOUTS[layout][1]])
    folders = root / "data" / "folders"
    runs["few_shot"] = ("linear", folders, ["--few_shot_samples=2"])
    runs["wav2vec2"] = ("adapter", folders, ["--backbone=wav2vec2"])
    runs["missing_folder"] = ("linear", root / "nowhere", [])
    runs["wrong_num_classes"] = ("linear", folders, ["--num_classes=5"])
    commands = [
        ("AudioFolder", quick_args(method, data, root / "out" / name, checkpoints, *extra))
        for name, (method, data, extra) in runs.items()
    ]
    outcomes = run_recipes(commands, root / "report.json")
    return {name: (data, root / "out" / name, outcome) for (name, (_, data, _)), outcome in zip(runs.items(), outcomes)}


def finished(recipe_runs, name: str) -> tuple[Path, Path, dict]:
    data, output, outcome = recipe_runs[name]
    assert outcome["code"] == 0, outcome["message"]
    return data, output, json.loads((output / "results.json").read_text())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recipe_end_to_end(recipe_runs, checkpoints, layout):
    data, output, results = finished(recipe_runs, layout)
    count = LAYOUTS[layout][0]["num_classes"]
    classes = [f"sound_{c}" for c in range(count)]
    fold = results["folds"]["official"]
    assert results["dataset"] == "AudioFolder" and results["method"] == "lora" and results["backbone"] == "ast"
    assert fold["classes"] == classes == read_classes(output / "manifests" / "classes.txt")
    assert results["settings"]["num_classes"] == count
    # the head is Linear(hidden, classes): built with the data's class count
    hidden = json.loads((checkpoints["ast"] / "config.json").read_text())["hidden_size"]
    assert results["parameters"]["trainable_groups"]["head"] == (hidden + 1) * count
    # the recorded configuration is concrete: what prediction and export rebuild
    assert "num_classes: null" not in (output / "hyperparams.yaml").read_text()
    assert f"\nnum_classes: {count}\n" in (output / "hyperparams.yaml").read_text()
    # the test stage scored the layout's test set, every item once
    test_rows = read_manifest(output / "manifests" / "test.csv")
    by_path = Counter(Path(row["wav"]).relative_to(data).as_posix() for row in test_rows)
    expected = expected_test_items(data, layout)
    assert (Counter(row["label"] for row in test_rows) if layout in ("folders", "csv") else by_path) == expected
    matrix = fold["test"]["confusion_matrix"]
    assert len(matrix) == count and all(len(row) == count for row in matrix)
    assert [sum(row) for row in matrix] == [sum(row["label"] == label for row in test_rows) for label in classes]


def test_few_shot_keeps_k_per_class_and_the_test_set(recipe_runs):
    _, output, results = finished(recipe_runs, "few_shot")
    _, full_output, full = finished(recipe_runs, "folders")
    assert results["few_shot_samples"] == 2 and results["folds"]["official"]["train_items"] == 2 * 3
    assert full["folds"]["official"]["train_items"] == 3 * (N_PER_CLASS - 2)
    assert read_manifest(output / "manifests" / "test.csv") == read_manifest(full_output / "manifests" / "test.csv")


def test_wav2vec2_backbone(recipe_runs):
    _, _, results = finished(recipe_runs, "wav2vec2")
    assert results["backbone"] == "wav2vec2" and results["method"] == "adapter"
    assert results["folds"]["official"]["classes"] == ["sound_0", "sound_1", "sound_2"]
    assert len(results["folds"]["official"]["test"]["confusion_matrix"]) == 3


def test_classify_the_run(recipe_runs):
    """Prediction rebuilds the model from the run's record: the data's classes, all of them scored."""
    data, output, _ = finished(recipe_runs, "folders")
    audio = sorted((data / "sound_1").iterdir())[0]
    process = subprocess.run(
        [sys.executable, "-m", "petl_modules.classify", "--run", str(output), str(audio), "--top_k=5", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    (prediction,) = json.loads(process.stdout)
    assert sorted(entry["label"] for entry in prediction["top_k"]) == ["sound_0", "sound_1", "sound_2"]
    assert sum(entry["score"] for entry in prediction["top_k"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing_folder", "AudioFolder recipe: error: --data_folder: {data} is not a folder; give the AudioFolder"),
        ("wrong_num_classes", "AudioFolder recipe: error: num_classes is 5 but the prepared AudioFolder data has 3"),
    ],
)
def test_bad_command_is_one_line(recipe_runs, name, message):
    data, output, outcome = recipe_runs[name]
    assert outcome["code"] == 1 and "\n" not in outcome["message"]
    assert outcome["message"].startswith(message.format(data=data))
    if name == "missing_folder":
        assert not output.exists()  # nothing written


def test_changed_class_count_under_an_unfinished_run_stops(tmp_path, checkpoints):
    """A run folder resumed after a class was added: its checkpoints have the old head, so it stops, naming both."""
    root = make_layout(tmp_path / "data", "folders")
    command = [("AudioFolder", quick_args("linear", root, tmp_path / "out", checkpoints))]
    assert run_recipes(command, tmp_path / "first.json")[0]["code"] == 0
    (tmp_path / "out" / "fold_result.json").unlink()  # as if stopped before the end
    (root / "sound_9").mkdir()
    for index in range(N_PER_CLASS):
        sf.write(root / "sound_9" / f"new{index}.wav", [0.1] * 4000, 16000)
    outcome = run_recipes(command, tmp_path / "second.json")[0]
    assert outcome["code"] == 1 and "\n" not in outcome["message"]
    assert outcome["message"] == (
        f"AudioFolder recipe: error: {tmp_path / 'out'} trained 3 classes but the prepared AudioFolder data has 4; "
        "choose another --output_folder"
    )


@pytest.mark.parametrize("method", METHODS)
def test_one_file_per_method(method):
    """hparams/<method>.yaml = the library's method block + audiofolder.yaml, num_classes left to the data."""
    from petl_modules.hparams_loader import compose_tree

    assert sorted(path.stem for path in (RECIPE / "hparams").glob("*.yaml")) == sorted([*METHODS, "audiofolder"])
    tree = compose_tree(RECIPE / "hparams" / f"{method}.yaml", {"data_folder": "d", "output_folder": "o"})
    assert tree["method_name"] == method and tree["num_classes"] is None
    assert {key: tree[key] for key in ("csv_file", "valid_fraction", "test_fraction", "split_seed")} == {
        "csv_file": None,
        "valid_fraction": 0.1,
        "test_fraction": 0.1,
        "split_seed": 0,
    }
