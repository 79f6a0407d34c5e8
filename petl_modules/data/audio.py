"""Audio loading that turns any WAV the five benchmarks ship into 16 kHz mono.

UrbanSound8K alone mixes 8/16/24/32-bit and float files, one to many channels
and rates from 8 to 96 kHz, so every dataset goes through the same reader
instead of trusting each one's nominal format.
"""

from __future__ import annotations

import functools
import io
import os

import soundfile as sf
import torch
import torchaudio

__all__ = ["AudioError", "AudioTooLongError", "audio_info", "decode_audio", "read_audio"]


class AudioError(ValueError):
    """An audio file is missing, empty or unreadable; the message names the file."""


class AudioTooLongError(AudioError):
    """Audio longer than the caller allows (`decode_audio`'s `max_seconds`), found from the header alone."""


def _fail(path: str | os.PathLike, problem: str) -> AudioError:
    """Build a one-line error so logs and pytest output stay grep-able."""
    return AudioError(f"{os.fspath(path)}: {' '.join(problem.split())}")


def _check_file(path: str | os.PathLike) -> None:
    """Give a precise reason for the two failures libsndfile reports vaguely."""
    if not os.path.isfile(path):
        raise _fail(path, "audio file not found")
    if os.path.getsize(path) == 0:
        raise _fail(path, "audio file is empty (0 bytes)")


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """Return `(num_frames, sample_rate)` from the header only.

    Manifests need durations for thousands of files; decoding them all would
    make preparation as slow as an epoch.
    """
    _check_file(path)
    try:
        info = sf.info(os.fspath(path))
    except (sf.SoundFileError, RuntimeError) as err:
        raise _fail(path, f"cannot read audio header ({err})") from err
    if info.frames <= 0:
        raise _fail(path, "audio file contains no samples")
    return int(info.frames), int(info.samplerate)


@functools.lru_cache(maxsize=32)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    """Build the resampler of one rate pair once.

    Its sinc kernel costs more to build than to apply to a short clip, and a
    dataset has only a handful of distinct rates.
    """
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def read_audio(path: str | os.PathLike, target_sr: int = 16000) -> torch.Tensor:
    """Read a file as a 1-D float32 tensor, downmixed by channel mean, at `target_sr`.

    Raises `AudioError` naming the file when it is missing, empty,
    undecodable, has no samples or holds non-finite values.
    """
    if isinstance(target_sr, bool) or not isinstance(target_sr, int) or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive int, got {target_sr!r}")
    _check_file(path)
    return _decode(os.fspath(path), target_sr, path)


def decode_audio(
    data: bytes, target_sr: int = 16000, name: str = "the upload", max_seconds: float | None = None
) -> torch.Tensor:
    """`read_audio` for audio held in memory (an upload): the same result, checks and one-line errors, which
    name `name`. With `max_seconds`, longer audio raises `AudioTooLongError`, from the header before decoding
    when it gives the length.
    """
    if not data:
        raise _fail(name, "audio is empty (0 bytes)")
    return _decode(io.BytesIO(data), target_sr, name, max_seconds)


def _check_length(frames: int, sample_rate: int, max_seconds: float | None, name: str | os.PathLike) -> None:
    if max_seconds is not None and frames > max_seconds * sample_rate:
        raise AudioTooLongError(f"{name}: the audio is over {max_seconds:g} s")


def _decode(source, target_sr: int, name: str | os.PathLike, max_seconds: float | None = None) -> torch.Tensor:
    """A file path or file object -> the checked mono waveform at `target_sr`; errors name `name`. Audio over
    `max_seconds` is refused from the header, before decoding, and again after it (a header may lack the length).
    """
    try:
        with sf.SoundFile(source) as handle:
            sample_rate = handle.samplerate
            _check_length(handle.frames, sample_rate, max_seconds, name)
            data = handle.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        raise _fail(name, f"cannot decode audio ({err})") from err
    _check_length(len(data), sample_rate, max_seconds, name)
    if data.shape[0] == 0:
        raise _fail(name, "audio file contains no samples")
    wav = torch.from_numpy(data).mean(dim=1)
    if not bool(torch.isfinite(wav).all()):
        raise _fail(name, "audio contains NaN or infinite samples")
    if sample_rate != target_sr:
        wav = _resampler(int(sample_rate), target_sr)(wav)
    return wav.contiguous()
