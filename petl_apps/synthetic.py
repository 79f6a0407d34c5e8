"""Tiny datasets in the five official layouts, for tests, smoke runs and the demo.

Each class is a sine at a class-specific frequency plus a little noise, so a
model can learn them; each generator reproduces the quirks of the real corpus
that preparation and audio loading must survive. Every `make_*` writes under
`root` and returns the dataset root to pass as `data_folder`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = [
    "make_audiofolder",
    "IEMOCAP_RAW_LABELS",
    "URBANSOUND8K_FORMATS",
    "class_frequency",
    "make_esc50",
    "make_fsc",
    "make_gsc",
    "make_iemocap",
    "make_urbansound8k",
]

# (sample rate, soundfile subtype, channels), cycled over the files.
URBANSOUND8K_FORMATS = (
    (44100, "PCM_16", 1),
    (48000, "PCM_24", 2),
    (44100, "PCM_24", 1),
    (22050, "PCM_U8", 1),
    (48000, "FLOAT", 2),
    (96000, "PCM_32", 1),
    (11025, "PCM_16", 3),
)
# Raw IEMOCAP labels: exc merges into hap, fru/xxx/sur are dropped.
IEMOCAP_RAW_LABELS = ("neu", "hap", "exc", "sad", "ang", "fru", "xxx", "sur")
_IEMOCAP_CLASS = {"neu": 0, "hap": 1, "exc": 1, "sad": 2, "ang": 3, "fru": 4, "xxx": 5, "sur": 6}

_FSC_ACTIONS = ("activate", "deactivate", "increase", "decrease", "change language", "bring")
_FSC_OBJECTS = ("lights", "heat", "music", "volume", "none")
_FSC_LOCATIONS = ("none", "kitchen", "bedroom", "washroom")
_ESC50_CATEGORIES = (
    "dog",
    "rooster",
    "pig",
    "cow",
    "frog",
    "cat",
    "hen",
    "insects",
    "sheep",
    "crow",
)
_URBANSOUND8K_CLASSES = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)
_GSC_WORDS = (
    "yes",
    "no",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "stop",
    "go",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "bed",
    "bird",
    "cat",
    "dog",
    "happy",
    "house",
    "marvin",
    "sheila",
    "tree",
    "wow",
    "backward",
    "forward",
    "follow",
    "learn",
    "visual",
)


def class_frequency(index: int) -> float:
    """Frequency of class `index`: 60 classes fit below 8 kHz, the 16 kHz Nyquist."""
    return 250.0 + 120.0 * index


def _tone(index: int, duration: float, sample_rate: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """A class-`index` sine plus noise, shape (frames, channels), peak below 0.6."""
    t = np.arange(round(duration * sample_rate)) / sample_rate
    wave = 0.5 * np.sin(2 * np.pi * class_frequency(index) * t + rng.uniform(0, 2 * np.pi))
    gains = np.linspace(1.0, 0.6, channels)
    noise = 0.02 * rng.standard_normal((len(t), channels))
    return (wave[:, None] * gains + noise).astype(np.float32)


def _write_wav(path: Path, data: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sample_rate, subtype=subtype, format="WAV")


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _names(pool: tuple[str, ...], count: int, fallback: str) -> list[str]:
    """Real class names first, then numbered ones, so any class count works."""
    return [pool[i] if i < len(pool) else f"{fallback}_{i}" for i in range(count)]


def make_fsc(root: Path, num_classes: int = 4, n_per_class: int = 2, seed: int = 0) -> Path:
    """Write Fluent Speech Commands with `num_classes` intents.

    `n_per_class` clips per intent in each official split, distinct speakers
    per split, the official header with its leading empty (pandas index)
    column, and transcriptions containing commas.
    """
    rng = np.random.default_rng(seed)
    intents = [(a, o, loc) for a in _FSC_ACTIONS for o in _FSC_OBJECTS for loc in _FSC_LOCATIONS]
    if num_classes > len(intents):
        raise ValueError(f"at most {len(intents)} intents")
    data_root = Path(root) / "fluent_speech_commands_dataset"
    header = ["", "path", "speakerId", "transcription", "action", "object", "location"]
    for split in ("train", "valid", "test"):
        rows = []
        for c, (action, obj, location) in enumerate(intents[:num_classes]):
            for i in range(n_per_class):
                speaker = f"{split}Spk{i % 2}"
                name = f"{int(rng.integers(16**8)):08x}-4474-11e9-{split}-{c:02d}{i:03d}"
                rel = f"wavs/speakers/{speaker}/{name}.wav"
                _write_wav(data_root / rel, _tone(c, 0.5, 16000, rng), 16000)
                text = f"{action} the {obj}, {location} please"
                rows.append([len(rows), rel, speaker, text, action, obj, location])
        _write_csv(data_root / "data" / f"{split}_data.csv", header, rows)
    return data_root


def make_esc50(root: Path, num_classes: int = 5, n_per_fold: int = 1, duration: float = 0.5, seed: int = 0) -> Path:
    """Write ESC-50: 44.1 kHz mono clips, `n_per_fold` per class and fold.

    The real clips are 5 s; `duration` defaults short for speed.
    """
    rng = np.random.default_rng(seed)
    data_root = Path(root) / "ESC-50-master"
    categories = _names(_ESC50_CATEGORIES, num_classes, "sound")
    rows = []
    for fold in range(1, 6):
        for c, category in enumerate(categories):
            for i in range(n_per_fold):
                src = 100000 + len(rows)
                take = "ABC"[i % 3]
                filename = f"{fold}-{src}-{take}-{c}.wav"
                _write_wav(data_root / "audio" / filename, _tone(c, duration, 44100, rng), 44100)
                rows.append([filename, fold, c, category, c < 10, src, take])
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    _write_csv(data_root / "meta" / "esc50.csv", header, rows)
    return data_root


def make_urbansound8k(root: Path, num_classes: int = 3, n_per_fold: int = 1, seed: int = 0) -> Path:
    """Write UrbanSound8K: `n_per_fold` clips per class in each of 10 folds.

    Files cycle through `URBANSOUND8K_FORMATS` (44.1/48/96 kHz and lower
    rates, 8/16/24/32-bit int and float, mono to 3 channels) and vary in length.
    """
    rng = np.random.default_rng(seed)
    data_root = Path(root) / "UrbanSound8K"
    classes = _names(_URBANSOUND8K_CLASSES, num_classes, "noise")
    rows = []
    for fold in range(1, 11):
        for c, name in enumerate(classes):
            for i in range(n_per_fold):
                sample_rate, subtype, channels = URBANSOUND8K_FORMATS[len(rows) % len(URBANSOUND8K_FORMATS)]
                duration = 0.25 + 0.05 * (len(rows) % 5)
                fs_id = 1000 + len(rows)
                filename = f"{fs_id}-{c}-0-{i}.wav"
                audio = _tone(c, duration, sample_rate, rng, channels)
                _write_wav(data_root / "audio" / f"fold{fold}" / filename, audio, sample_rate, subtype)
                rows.append([filename, fs_id, 0.0, duration, 1, fold, c, name])
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    _write_csv(data_root / "metadata" / "UrbanSound8K.csv", header, rows)
    return data_root


def make_gsc(root: Path, num_words: int = 4, n_per_class: int = 2, seed: int = 0) -> Path:
    """Write Speech Commands v2: `n_per_class` clips per word in each split.

    Every third clip is shorter than 1 s; a `_background_noise_` folder holds
    a long wav and a README, and a LICENSE sits at the root.
    """
    rng = np.random.default_rng(seed)
    data_root = Path(root) / "speech_commands_v0.02"
    lists: dict[str, list[str]] = {"valid": [], "test": []}
    count = 0
    for w, word in enumerate(_names(_GSC_WORDS, num_words, "word")):
        for split in ("train", "valid", "test"):
            for i in range(n_per_class):
                duration = 0.6 if count % 3 == 0 else 1.0
                entry = f"{word}/{int(rng.integers(16**8)):08x}_nohash_{i}.wav"
                _write_wav(data_root / entry, _tone(w, duration, 16000, rng), 16000)
                if split != "train":
                    lists[split].append(entry)
                count += 1
    noise = 0.1 * rng.standard_normal((5 * 16000, 1)).astype(np.float32)
    _write_wav(data_root / "_background_noise_" / "white_noise.wav", noise, 16000)
    (data_root / "_background_noise_" / "README.md").write_text("noise\n", encoding="utf-8")
    (data_root / "LICENSE").write_text("CC-BY-4.0\n", encoding="utf-8")
    (data_root / "validation_list.txt").write_text("\n".join(lists["valid"]) + "\n", encoding="utf-8")
    (data_root / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n", encoding="utf-8")
    return data_root


def make_iemocap(root: Path, n_per_class: int = 1, dialogs_per_session: int = 2, seed: int = 0) -> Path:
    """Write IEMOCAP: 5 sessions with `dialogs_per_session` dialogs each.

    Both speakers talk in every dialog, each with `n_per_class` turns of every
    label in `IEMOCAP_RAW_LABELS` (so exc, fru, xxx, sur appear).
    EmoEvaluation files carry the header and evaluator lines, beside a
    `Categorical/` subfolder that preparation must ignore.
    """
    rng = np.random.default_rng(seed)
    data_root = Path(root) / "IEMOCAP_full_release"
    for session in range(1, 6):
        dialogs = [
            f"Ses0{session}F_impro{d + 1:02d}" if d % 2 == 0 else f"Ses0{session}M_script{d + 1:02d}_1"
            for d in range(dialogs_per_session)
        ]
        turns: dict[str, list[str]] = {dialog: [] for dialog in dialogs}
        evaluations = data_root / f"Session{session}" / "dialog" / "EmoEvaluation"
        for gender in "FM":
            count = 0
            for label in IEMOCAP_RAW_LABELS:
                for _ in range(n_per_class):
                    dialog = dialogs[count % dialogs_per_session]
                    utt_id = f"{dialog}_{gender}{count:03d}"
                    start = 1.5 * count
                    turns[dialog].append(
                        f"[{start:.4f} - {start + 1.2:.4f}]\t{utt_id}\t{label}\t"
                        "[2.5000, 2.5000, 2.5000]\n"
                        "C-E2:\tNeutral;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n"
                    )
                    wav = data_root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt_id}.wav"
                    _write_wav(wav, _tone(_IEMOCAP_CLASS[label], 0.5, 16000, rng), 16000)
                    count += 1
        for dialog, lines in turns.items():
            evaluations.mkdir(parents=True, exist_ok=True)
            text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "".join(lines)
            (evaluations / f"{dialog}.txt").write_text(text, encoding="utf-8")
            (evaluations / "Categorical").mkdir(exist_ok=True)
            (evaluations / "Categorical" / f"{dialog}_e2_cat.txt").write_text(
                f"{dialog}_F000 :Neutral state; ()\n", encoding="utf-8"
            )
    return data_root


def make_audiofolder(
    root: str | os.PathLike,
    num_classes: int = 3,
    n_per_class: int = 6,
    layout: str = "folders",
    extensions: Sequence[str] = ("wav", "flac", "ogg"),
    seed: int = 0,
) -> Path:
    """Write a tiny data set of your own in either layout; returns the data folder (`root`).

    Class `c` is `sound_<c>` (a tone of `class_frequency(c)`); the layouts `recipes/AudioFolder` reads.
    Files cycle through `extensions` and through 8/16/44.1 kHz, mono and stereo. `layout="folders"`
    writes `root/sound_<c>/clip<i>.<ext>`; `"csv"` writes `root/audio/<c>_<i>.<ext>` and `root/labels.csv`
    (`path,label`, paths relative to `root`); `"csv_split"` adds a `split` column that puts the
    last two clips of each class in valid and test.
    """
    if layout not in ("folders", "csv", "csv_split"):
        raise ValueError(f"layout must be folders, csv or csv_split, got {layout!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    formats = ((16000, 1), (44100, 2), (8000, 1))
    for c in range(num_classes):
        for i in range(n_per_class):
            count = c * n_per_class + i
            sample_rate, channels = formats[count % len(formats)]
            extension = extensions[count % len(extensions)]
            rel = f"sound_{c}/clip{i}.{extension}" if layout == "folders" else f"audio/{c}_{i}.{extension}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, _tone(c, 0.4 + 0.1 * (i % 3), sample_rate, rng, channels), sample_rate)
            split = "valid" if i == n_per_class - 2 else "test" if i == n_per_class - 1 else "train"
            rows.append([rel, f"sound_{c}", split])
    if layout != "folders":
        with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "label", "split"] if layout == "csv_split" else ["path", "label"])
            writer.writerows(row if layout == "csv_split" else row[:2] for row in rows)
    return root
