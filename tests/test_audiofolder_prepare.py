"""Your own data (recipes/AudioFolder): class folders and CSV layouts, split lists, the seeded stratified split,
few-shot, reuse, one-line errors, and (once its train.py exists) the recipe end to end."""

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

from petl_modules.data import DataPreparationError, read_classes, read_manifest
from petl_modules.data.audiofolder import make_audiofolder, prepare_audiofolder, stratified_split
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


@pytest.mark.skipif(not (RECIPE / "train.py").is_file(), reason="recipes/AudioFolder/train.py not written yet")
@pytest.mark.parametrize("layout", ["folders", "csv_split"])
def test_recipe_end_to_end(tmp_path, layout):
    from petl_modules.checkpoints import write_random_checkpoint

    root = make_audiofolder(tmp_path / "data", num_classes=3, n_per_class=5, layout=layout)
    ast = write_random_checkpoint("ast", tmp_path / "ast")
    command = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "linear.yaml"),
        f"--data_folder={root}",
        f"--output_folder={tmp_path / 'out'}",
        f"--backbone_source={ast}",
        "--target_length=50",
        "--number_of_epochs=1",
        "--batch_size=4",
        "--num_workers=0",
        "--device=cpu",
        "--noprogressbar",
    ] + (["--csv_file=labels.csv"] if layout != "folders" else [])
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    fold = results["folds"]["official"]
    assert fold["classes"] == ["sound_0", "sound_1", "sound_2"]  # num_classes from the data
    assert len(fold["test"]["confusion_matrix"]) == 3
