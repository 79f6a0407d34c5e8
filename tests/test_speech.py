"""The eSpeak NG spoken-word data: synthesis, speaker splits, the Speech Commands layout, determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from heard_noise import heard_noise

from petl_apps import speech
from petl_apps.speech import (
    GSC_COMMAND_WORDS,
    SPEAKER_SPLITS,
    SpeechSynthesisError,
    file_stem,
    make_spoken_gsc,
    speaker_pool,
    speaker_splits,
    synthesize,
)
from petl_modules.data import read_manifest

_SPEC = importlib.util.spec_from_file_location(
    "gsc_prepare", Path(__file__).resolve().parent.parent / "recipes" / "GSC" / "gsc_prepare.py"
)
gsc_prepare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gsc_prepare)
WORDS = ("yes", "no")
SPEAKERS_PER_SPLIT = {"train": 2, "valid": 1, "test": 1}
CLIPS = {"train": 2, "valid": 1, "test": 1}


def tiny_gsc(root, seed=0):
    parts = speaker_splits(seed)
    speakers = {split: parts[split][:count] for split, count in SPEAKERS_PER_SPLIT.items()}
    return make_spoken_gsc(root, speakers, CLIPS, words=WORDS, seed=seed), speakers


def _fundamental(samples: np.ndarray, rate: int = 16000) -> float:
    """Harmonic-product-spectrum pitch estimate (60-400 Hz) of the loudest 200 ms: independent of eSpeak NG.

    The product of the spectrum with its 2x, 3x and 4x compressions peaks at the fundamental, where a plain
    autocorrelation maximum can land on a strong harmonic (an octave error).
    """
    frame = 3200
    energies = [np.sum(samples[i : i + frame] ** 2) for i in range(0, max(1, len(samples) - frame), 160)]
    start = int(np.argmax(energies)) * 160
    x = samples[start : start + frame]
    size = 1 << 16
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), n=size))
    product = spectrum.copy()
    for k in (2, 3, 4):
        compressed = spectrum[::k]
        product[: len(compressed)] *= compressed
    freqs = np.fft.rfftfreq(size, 1 / rate)
    band = (freqs >= 60) & (freqs <= 400)
    return float(freqs[band][np.argmax(product[band])])


def test_synthesis_is_speech_at_16_khz_and_follows_pitch_and_rate():
    normal = synthesize("seven", "en-us", rate=175, pitch=50)
    assert normal.dtype == np.float32 and 0.25 < len(normal) / 16000 < 1.0
    assert np.abs(normal).max() <= 1.0 and np.abs(normal[:10]).max() > 1e-3  # leading silence trimmed
    # pitch 90 vs 50 (measured 149 vs 98 Hz); below 50 the voice's fundamental is too weak to estimate
    assert _fundamental(synthesize("seven", "en-us", pitch=90)) > 1.3 * _fundamental(
        synthesize("seven", "en-us", pitch=50)
    )
    assert len(synthesize("seven", "en-us", rate=300)) < 0.8 * len(synthesize("seven", "en-us", rate=120))


def test_an_unknown_voice_is_named():
    with pytest.raises(SpeechSynthesisError, match="no voice 'xx-nowhere'"):
        synthesize("yes", "xx-nowhere")


def test_speakers_are_partitioned_by_seed():
    pool = speaker_pool()
    assert len(pool) > 400 and len(set(pool)) == len(pool)
    parts = speaker_splits(0)
    for name, fraction in SPEAKER_SPLITS.items():
        assert len(parts[name]) == int(fraction * len(pool))
    every = [speaker for part in parts.values() for speaker in part]
    assert len(set(every)) == len(every)  # disjoint
    assert speaker_splits(0) == parts and speaker_splits(1)["test"] != parts["test"]


def test_spoken_gsc_layout_lists_disjoint_voices_and_recipe_preparation(tmp_path):
    root, speakers = tiny_gsc(tmp_path / "a")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["_background_noise_", "no", "yes"]
    noises = sorted(p.name for p in (root / "_background_noise_").iterdir())
    assert noises == ["brown_noise.wav", "mains_hum.wav", "pink_noise.wav", "white_noise.wav"]
    lists = {
        split: (root / name).read_text().split()
        for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt"))
    }
    for split, entries in lists.items():
        assert sorted(entries) == sorted(
            f"{w}/{file_stem(s, i)}.wav" for w in WORDS for s in speakers[split] for i in range(CLIPS[split])
        )
    files = sorted(str(p.relative_to(root)) for p in root.glob("*/*.wav") if p.parent.name in WORDS)
    assert len(files) == len(WORDS) * sum(SPEAKERS_PER_SPLIT[s] * CLIPS[s] for s in CLIPS)
    hashes = {split: {entry.split("/")[1].split("_")[0] for entry in entries} for split, entries in lists.items()}
    train = {f.split("/")[1].split("_")[0] for f in files} - hashes["valid"] - hashes["test"]
    assert len(train) == 2 and not (
        train & hashes["valid"] or train & hashes["test"] or hashes["valid"] & hashes["test"]
    )
    info = sf.info(root / files[0])
    assert (info.samplerate, info.frames, info.subtype, info.channels) == (16000, 16000, "PCM_16", 1)

    manifests = gsc_prepare.prepare_gsc(root, tmp_path / "manifests")
    rows = {split: read_manifest(path) for split, path in manifests.items()}
    assert {split: len(r) for split, r in rows.items()} == {"train": 8, "valid": 2, "test": 2}
    assert sorted({row["label"] for row in rows["train"]}) == ["no", "yes"]


def test_generation_is_deterministic_and_reused(tmp_path):
    first, _ = tiny_gsc(tmp_path / "a")
    second, _ = tiny_gsc(tmp_path / "b")

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.wav")}

    assert digest(first) == digest(second) and len(digest(first)) == 16
    stamp = (first / "dataset.json").stat().st_mtime_ns
    tiny_gsc(tmp_path / "a")  # same settings: reused
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    other, _ = tiny_gsc(tmp_path / "a", seed=1)  # other settings: replaced
    assert digest(other) != digest(second)


def test_clip_draws_name_the_noise_each_clip_holds():
    """`clip_draws` and `background_noise` say which noise `spoken_clip` mixed in, and from which sample: checked
    in the clips' own samples (`heard_noise`: exact silence before a clean word, else the matching noise stretch).
    """
    noises = speech.background_noises(0)
    assert list(noises) == list(speech.NOISE_NAMES)
    speaker = speaker_splits(0)["train"][0]
    speech.reset_synthesizer()
    heard = []
    for index in range(8):
        clip = speech.spoken_clip("yes", speaker, index, 0, list(noises.values()))
        draws = speech.clip_draws("yes", speaker, index, 0)
        name, start = heard_noise(clip, noises)
        assert (name, start) == (speech.background_noise("yes", speaker, index, 0), draws.noise_start), index
        assert (draws.noise is None) == (name == "none") == (draws.snr_db is None)
        if name == "none":  # nothing added after the word was scaled to its peak
            assert float(np.abs(clip).max()) == pytest.approx(draws.peak, rel=1e-5)
        heard.append(name)
    assert heard.count("none") >= 2 and len(set(heard) - {"none"}) >= 2  # both kinds, several noises


def test_about_half_the_clips_hold_a_noise_each_noise_as_often():
    labels = Counter(
        speech.background_noise(word, speaker, 0, 0) for word in GSC_COMMAND_WORDS for speaker in speaker_pool()[:200]
    )
    assert set(labels) == {"none", *speech.NOISE_NAMES}
    assert labels["none"] / 2000 == pytest.approx(1 - speech.NOISE_PROBABILITY, abs=0.05)
    for name in speech.NOISE_NAMES:
        assert labels[name] / 2000 == pytest.approx(speech.NOISE_PROBABILITY / len(speech.NOISE_NAMES), abs=0.03)


def test_importing_the_library_never_needs_espeak():
    code = (
        "import sys; sys.modules['espeakng_loader'] = None; import petl_modules, petl_apps.demo, "
        "petl_apps.pretrain, petl_apps.speech; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_missing_synthesizer_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(SpeechSynthesisError, match="pip install espeakng-loader"):
        speech._ESpeak()  # what the first synthesis builds (the process keeps one library handle)
