"""Spoken words from a real speech synthesizer: eSpeak NG (the `espeakng-loader` wheel) through ctypes.

The demo's data: the ten Speech Commands command words in the Speech Commands v2 layout
(`make_spoken_gsc`), and other words for pretraining (`synthesize_clips`). A *speaker* is an English
eSpeak NG voice with a voice variant (`en-us+m3`, `en-gb-scotland+f2`, ...); every clip also draws its
speaking rate, pitch, pitch range, loudness, background noise (SNR) and, when `TIME_SHIFT` > 0, its
position in the 1 s clip (centred by default). `clip_draws` gives a clip's draws without synthesising it
(`background_noise`: the demo's second task's label).

Invariants:
- Deterministic: the synthesizer is reset before each speaker, so a speaker's clips depend only on
  (seed, speaker, words, clips per speaker), never on other speakers: the same call writes the same bytes.
- Speakers never overlap between splits: `speaker_splits` partitions one shuffled pool into test, valid,
  train and pretrain speakers, and callers take the first N of a part.
- Optional: `espeakng-loader` is imported on first synthesis only; without it, `SpeechSynthesisError`
  says `pip install espeakng-loader`. Importing this module never needs it.
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from petl_modules.atomic import write_json_atomic

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s clips, as in Speech Commands
GSC_COMMAND_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# Other English words for pretraining: none of the 35 Speech Commands words.
PRETRAIN_WORDS = tuple(
    """
    able about after again air all also always animal answer apple around ask away baby back ball bank
    basket bear before begin bell best better big black blue boat body book bottle box boy bread bring
    brother brown build busy butter buy cake call can car care carry chair change cheese child city class
    clean clock close cloud coat cold color come cook corn cow cup dark day deep desk dinner door dream
    drink drive duck early earth east easy eat egg end enough even evening every eye face fall family far
    farm fast father feel few field fire fish floor flower fly food foot friend frog full game garden
    girl give glass gold good grass great green ground grow hair half hand hard hat head hear heart heavy
    help here hill hold home horse hot hour ice idea inside iron jump just keep key kind king kitchen
    know lake land large last late laugh leaf light like line lion little long look love low make man
    many milk money moon morning mother mountain mouth music name near never new nice night noise north
    nothing number ocean old open orange other outside paper party pencil people picture pig place plant
    play pocket pretty purple queen quick quiet rain red rest rich river road rock room round run salt
    same sand school sea seed shoe shop short sing sister sleep slow small smile snow soft song soon
    sound south spring square star start still stone story street strong study summer sun sweet table
    talk tall teacher thank thing think time today together tomorrow town toy train travel truck
    true turn under uncle use very village voice wait walk wall warm wash watch water weather week west
    wet white wind window winter woman wood word work world write yellow young
    """.split()
)
ENGLISH_VOICES = (
    "en",
    "en-us",
    "en-us-nyc",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
)
SPEAKER_SPLITS = {"test": 0.125, "valid": 0.125, "train": 0.25, "pretrain": 0.5}  # fractions of the pool
NOISE_SECONDS = 10
NOISE_NAMES = ("white_noise", "pink_noise", "brown_noise", "mains_hum")  # `background_noises`, in order
# Per-clip draws (uniform): speaking rate (words per minute), pitch and pitch range (0-100), peak level,
# signal-to-noise ratio in dB, and how often noise is mixed in.
# Moderate on purpose: a transformer trained from scratch on a CPU in minutes must still learn from them.
RATE = (150, 211)
PITCH = (35, 66)
PITCH_RANGE = (35, 76)
PEAK = (0.2, 0.9)
SNR_DB = (10.0, 30.0)
NOISE_PROBABILITY = 0.5
# The word is centred (its start still varies with its length): even +-5 % of the free time around it
# kept the small AST from learning within the demo's minutes (measured; see petl_apps/pretrain.py).
TIME_SHIFT = 0.0  # the word starts anywhere in this fraction of the free time around it, centred
STAMP = "dataset.json"  # written last: a data folder without it is incomplete

# eSpeak NG's speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def clip_settings() -> dict:
    """The per-clip draws' ranges: part of every cache key of data made with `spoken_clip`."""
    return {
        "rate": list(RATE),
        "pitch": list(PITCH),
        "pitch_range": list(PITCH_RANGE),
        "peak": list(PEAK),
        "snr_db": list(SNR_DB),
        "noise_probability": NOISE_PROBABILITY,
        "time_shift": TIME_SHIFT,
        "noise_seconds": NOISE_SECONDS,
    }


class SpeechSynthesisError(RuntimeError):
    """The synthesizer is missing or refused a voice; the message says what to install or change."""


class _ESpeak:
    """The process-wide eSpeak NG library, initialised for synchronous retrieval of samples."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise SpeechSynthesisError("the spoken-word data needs eSpeak NG: pip install espeakng-loader") from None
        self.library_path = espeakng_loader.get_library_path()
        self.data_path = Path(espeakng_loader.get_data_path())
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._receive)  # kept referenced: the library calls it
        self._load()

    def _load(self) -> None:
        self.library = ctypes.CDLL(self.library_path)
        self.library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = self.library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if self.sample_rate <= 0:
            raise SpeechSynthesisError(f"eSpeak NG failed to initialise with the voice data in {self.data_path}")
        self.library.espeak_SetSynthCallback(self._callback)

    def reset(self) -> None:
        """Unload and reload the library: its hidden state (the pitch flutter's phase) starts afresh."""
        if hasattr(_ctypes, "dlclose"):  # POSIX; elsewhere the state carries over (not reproducible)
            _ctypes.dlclose(self.library._handle)
        self._load()

    def _receive(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # continue

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        """`text` spoken by `voice`, as int16 samples at the library's rate (22,050 Hz)."""
        if self.library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SpeechSynthesisError(f"eSpeak NG has no voice {voice!r}; see its voices/ and voices/!v folders")
        for parameter, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch), (_ESPEAK_RANGE, pitch_range)):
            self.library.espeak_SetParameter(parameter, int(value), 0)
        self.library.espeak_SetParameter(_ESPEAK_VOLUME, 100, 0)
        self.library.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        data = text.encode() + b"\0"
        self.library.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, 0, None, None)
        self.library.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@lru_cache(maxsize=1)
def _engine() -> _ESpeak:
    return _ESpeak()


def synthesize(
    text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
) -> np.ndarray:
    """`text` spoken by `voice` (e.g. "en-us+m3"): float32 samples in [-1, 1] at 16 kHz, silences trimmed.

    `rate` is in words per minute (80-450), `pitch` and `pitch_range` in eSpeak NG's 0-100 scale, `seed`
    seeds the synthesizer's own random numbers. The library also keeps a state from one call to the next
    (its pitch flutter), so a call is reproducible after `reset_synthesizer()` and the same earlier calls.
    """
    engine = _engine()
    samples = engine.synthesize(text, voice, rate, pitch, pitch_range, seed).astype(np.float32) / 32768.0
    voiced = np.flatnonzero(np.abs(samples) > 1e-3)
    samples = samples[voiced[0] : voiced[-1] + 1] if len(voiced) else samples[:0]
    return resample_poly(samples, SAMPLE_RATE, engine.sample_rate).astype(np.float32)


def reset_synthesizer() -> None:
    """Start the synthesizer afresh (see `synthesize`); the generators below do so before each speaker."""
    _engine().reset()


def speaker_pool() -> list[str]:
    """Every speaker: each English voice alone and with each voice variant of the installed data."""
    variants_folder = _engine().data_path / "voices" / "!v"
    variants = sorted(p.name for p in variants_folder.iterdir() if p.is_file() and " " not in p.name)
    return [voice + (f"+{variant}" if variant else "") for voice in ENGLISH_VOICES for variant in ("", *variants)]


def speaker_splits(seed: int = 0) -> dict[str, list[str]]:
    """The speaker pool shuffled with `seed` and cut into disjoint parts (`SPEAKER_SPLITS`)."""
    pool = speaker_pool()
    order = np.random.default_rng(seed).permutation(len(pool))
    parts, start = {}, 0
    for name, fraction in SPEAKER_SPLITS.items():
        size = int(fraction * len(pool))
        parts[name] = [pool[i] for i in order[start : start + size]]
        start += size
    return parts


def _coloured_noise(rng: np.random.Generator, samples: int, exponent: float) -> np.ndarray:
    """Noise with a 1 / f**exponent power spectrum (0 white, 1 pink, 2 brown), peak 0.5."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    frequencies = np.fft.rfftfreq(samples, 1 / SAMPLE_RATE)
    spectrum /= np.maximum(frequencies, 20.0) ** (exponent / 2)
    noise = np.fft.irfft(spectrum, samples)
    return (0.5 * noise / np.abs(noise).max()).astype(np.float32)


def background_noises(seed: int = 0, seconds: int = NOISE_SECONDS) -> dict[str, np.ndarray]:
    """The `_background_noise_` sounds (`NOISE_NAMES`, in order): white, pink and brown noise, a mains hum."""
    rng = np.random.default_rng([seed, 1])
    samples = seconds * SAMPLE_RATE
    t = np.arange(samples) / SAMPLE_RATE
    hum = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
    hum = hum + 0.1 * rng.standard_normal(samples)
    sounds = (
        _coloured_noise(rng, samples, 0.0),
        _coloured_noise(rng, samples, 1.0),
        _coloured_noise(rng, samples, 2.0),
        (0.5 * hum / np.abs(hum).max()).astype(np.float32),
    )
    return dict(zip(NOISE_NAMES, sounds, strict=True))


@dataclass(frozen=True)
class ClipDraws:
    """A clip's random draws (`clip_draws`), in the order `spoken_clip` uses them.

    `shift` is in [0, 1) (the word's offset: `TIME_SHIFT`); `noise` is the index of the background noise mixed
    in, or None for a clean clip, in which case `noise_start` and `snr_db` are None too.
    """

    rate: int
    pitch: int
    pitch_range: int
    synthesizer_seed: int
    shift: float
    peak: float
    noise: int | None
    noise_start: int | None
    snr_db: float | None


def clip_draws(
    word: str,
    speaker: str,
    index: int,
    seed: int,
    noise_lengths: Sequence[int] = (NOISE_SECONDS * SAMPLE_RATE,) * len(NOISE_NAMES),
) -> ClipDraws:
    """The random draws of `spoken_clip(word, speaker, index, seed, noises)`, without synthesising anything.

    They depend only on (seed, word, speaker, index) and the noises' lengths in samples (`noise_lengths`; the
    default: `background_noises()`'s, as in the data sets). `spoken_clip` itself makes its clip from them.
    """
    rng = np.random.default_rng([seed, zlib.crc32(word.encode()), zlib.crc32(speaker.encode()), index])
    rate, pitch, pitch_range = int(rng.integers(*RATE)), int(rng.integers(*PITCH)), int(rng.integers(*PITCH_RANGE))
    synthesizer_seed, shift, peak = int(rng.integers(2**31)), float(rng.random()), float(rng.uniform(*PEAK))
    noise = noise_start = snr_db = None
    if rng.random() < NOISE_PROBABILITY:
        noise = int(rng.integers(len(noise_lengths)))
        noise_start = int(rng.integers(0, noise_lengths[noise] - CLIP_SAMPLES + 1))
        snr_db = float(rng.uniform(*SNR_DB))
    return ClipDraws(rate, pitch, pitch_range, synthesizer_seed, shift, peak, noise, noise_start, snr_db)


def background_noise(word: str, speaker: str, index: int, seed: int) -> str:
    """The background noise of the data sets' clip (`make_spoken_gsc`): one of `NOISE_NAMES`, or "none"."""
    noise = clip_draws(word, speaker, index, seed).noise
    return "none" if noise is None else NOISE_NAMES[noise]


def spoken_clip(word: str, speaker: str, index: int, seed: int, noises: Sequence[np.ndarray]) -> np.ndarray:
    """One 1 s clip of `word` by `speaker`: random rate, pitch, loudness, noise (`SNR_DB`), time shift.

    The random draws (`clip_draws`) depend only on (seed, word, speaker, index); the voice also on the
    synthesizer's state.
    """
    draws = clip_draws(word, speaker, index, seed, [len(noise) for noise in noises])
    speech = synthesize(
        word, speaker, rate=draws.rate, pitch=draws.pitch, pitch_range=draws.pitch_range, seed=draws.synthesizer_seed
    )[:CLIP_SAMPLES]
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    free = CLIP_SAMPLES - len(speech)
    offset = free // 2 + int(round(TIME_SHIFT * free * (draws.shift - 0.5)))
    clip[offset : offset + len(speech)] = speech * (draws.peak / max(np.abs(speech).max(), 1e-6))
    if draws.noise is not None:
        segment = noises[draws.noise][draws.noise_start : draws.noise_start + CLIP_SAMPLES]
        speech_power = float(np.mean(clip[offset : offset + len(speech)] ** 2)) if len(speech) else 0.0
        gain = np.sqrt(speech_power / max(float(np.mean(segment**2)), 1e-12) / 10 ** (draws.snr_db / 10))
        clip = clip + gain * segment
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def synthesize_clips(
    words: Sequence[str], speakers: Sequence[str], clips_per_speaker: int, seed: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(word index, 1 s clip) for every word, speaker and clip index, with the same noises as the data sets."""
    noises = list(background_noises(seed).values())
    for speaker in speakers:
        reset_synthesizer()
        for w, word in enumerate(words):
            for index in range(clips_per_speaker):
                yield w, spoken_clip(word, speaker, index, seed, noises)


def file_stem(speaker: str, index: int) -> str:
    """Speech Commands' file name: `<speaker hash>_nohash_<index>` (the hash is a stable 8 hex digits)."""
    return f"{hashlib.sha1(speaker.encode()).hexdigest()[:8]}_nohash_{index}"


def spoken_entries(settings: dict) -> Iterator[tuple[str, str, str, int, str]]:
    """Every clip of a spoken data set's settings (its `dataset.json`), in the order `make_spoken_gsc` writes them:
    (split, speaker, word, index, the file's path relative to the data root).
    """
    for split in ("train", "valid", "test"):
        for speaker in settings["speakers"][split]:
            for word in settings["words"]:
                for index in range(settings["clips_per_speaker"][split]):
                    yield split, speaker, word, index, f"{word}/{file_stem(speaker, index)}.wav"


def make_spoken_gsc(
    root: str | os.PathLike,
    speakers: dict[str, Sequence[str]],
    clips_per_speaker: dict[str, int],
    words: Sequence[str] = GSC_COMMAND_WORDS,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write (or reuse) spoken `words` in the Speech Commands v2 layout under `root/speech_commands_v0.02`.

    `speakers` and `clips_per_speaker` map each split (train, valid, test) to its speakers and clips per
    speaker and word; valid and test files are listed in `validation_list.txt` and `testing_list.txt`.
    The folder is built beside its final place and renamed when complete, with a `dataset.json` stamp of
    its settings: a folder with the same stamp is reused, any other is replaced. `progress(n)` is called
    after each clip. Returns the data root.
    """
    data_root = Path(root) / "speech_commands_v0.02"
    settings = {
        "words": list(words),
        "speakers": {split: list(speakers[split]) for split in ("train", "valid", "test")},
        "clips_per_speaker": {split: int(clips_per_speaker[split]) for split in ("train", "valid", "test")},
        "seed": seed,
        "clips": clip_settings(),
    }
    overlap = set(speakers["train"]) & set(speakers["valid"]) | set(speakers["train"]) & set(speakers["test"])
    if overlap | (set(speakers["valid"]) & set(speakers["test"])):
        raise ValueError(f"speakers must differ between splits; shared: {sorted(overlap)[:3]}")
    stamp = data_root / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return data_root
    building = Path(root) / ".speech_commands_v0.02.building"
    shutil.rmtree(building, ignore_errors=True)
    noises = background_noises(seed)
    for name, noise in noises.items():
        _write_wav(building / "_background_noise_" / f"{name}.wav", noise)
    lists: dict[str, list[str]] = {"valid": [], "test": []}
    speaking = None
    for split, speaker, word, index, entry in spoken_entries(settings):
        if speaker != speaking:  # each speaker's clips start from a reset synthesizer
            reset_synthesizer()
            speaking = speaker
        _write_wav(building / entry, spoken_clip(word, speaker, index, seed, list(noises.values())))
        if split in lists:
            lists[split].append(entry)
        if progress is not None:
            progress(1)
    (building / "validation_list.txt").write_text("\n".join(lists["valid"]) + "\n", encoding="utf-8")
    (building / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n", encoding="utf-8")
    (building / "README.md").write_text(
        "Synthetic spoken words (eSpeak NG voices), Speech Commands v2 layout; see petl_apps/speech.py.\n",
        encoding="utf-8",
    )
    write_json_atomic(building / STAMP, settings)
    shutil.rmtree(data_root, ignore_errors=True)
    data_root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(building, data_root)
    return data_root


def _write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, SAMPLE_RATE, subtype="PCM_16")
