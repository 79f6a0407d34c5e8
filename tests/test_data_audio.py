"""read_audio / audio_info: every WAV quirk of the benchmarks ends as 16 kHz mono."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from petl_apps.synthetic import URBANSOUND8K_FORMATS, make_urbansound8k
from petl_modules.data import AudioError, AudioTooLongError, audio_info, decode_audio, read_audio


def _sine(freq: float, sample_rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("sample_rate, subtype, channels", URBANSOUND8K_FORMATS)
def test_every_format_becomes_16k_mono_with_the_right_length(
    tmp_path: Path, sample_rate: int, subtype: str, channels: int
) -> None:
    signal = _sine(1000.0, sample_rate, 0.4)
    path = tmp_path / "clip.wav"
    sf.write(path, np.stack([signal] * channels, axis=1), sample_rate, subtype=subtype)

    wav = read_audio(path)

    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert len(wav) == math.ceil(len(signal) * 16000 / sample_rate)
    assert audio_info(path) == (len(signal), sample_rate)
    # The tone survives resampling: its spectrum peaks at 1 kHz (2.5 Hz bins).
    spectrum = torch.fft.rfft(wav).abs()
    assert abs(spectrum.argmax().item() * 16000 / len(wav) - 1000.0) < 5.0
    assert 0.4 < wav.abs().max().item() < 0.6


def test_downmix_is_the_channel_mean(tmp_path: Path) -> None:
    left = _sine(440.0, 16000, 0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, 0.5 * left], axis=1), 16000, subtype="FLOAT")

    assert torch.allclose(read_audio(path), torch.from_numpy(0.75 * left), atol=1e-6)


def test_target_rate_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, _sine(300.0, 44100, 0.5), 44100)

    assert len(read_audio(path, target_sr=8000)) == math.ceil(0.5 * 44100 * 8000 / 44100)
    with pytest.raises(ValueError, match="target_sr"):
        read_audio(path, target_sr=0)


def test_every_synthetic_urbansound8k_file_reads(tmp_path: Path) -> None:
    root = make_urbansound8k(tmp_path, num_classes=2, n_per_fold=1)
    files = sorted(root.glob("audio/fold*/*.wav"))
    assert {sf.info(f).samplerate for f in files} >= {44100, 48000}
    assert {sf.info(f).subtype for f in files} >= {"PCM_U8", "PCM_24", "FLOAT"}
    for path in files:
        frames, sample_rate = audio_info(path)
        assert len(read_audio(path)) == math.ceil(frames * 16000 / sample_rate)


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, words: str) -> None:
    message = str(err.value)
    assert str(path) in message and words in message and "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    for reader in (read_audio, audio_info):
        with pytest.raises(AudioError) as err:
            reader(path)
        _assert_one_line_naming(err, path, "not found")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(AudioError) as err:
        read_audio(path)
    _assert_one_line_naming(err, path, "empty")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)))
    for reader in (read_audio, audio_info):
        with pytest.raises(AudioError) as err:
            reader(path)
        _assert_one_line_naming(err, path, "cannot")
    assert issubclass(AudioError, ValueError)


def test_header_without_samples(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(AudioError) as err:
        read_audio(path)
    _assert_one_line_naming(err, path, "no samples")


def test_non_finite_samples(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    data = _sine(440.0, 16000, 0.1)
    data[10] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        read_audio(path)
    _assert_one_line_naming(err, path, "NaN")


@pytest.mark.parametrize("sample_rate, subtype, channels", URBANSOUND8K_FORMATS[:4])
@pytest.mark.parametrize("container", ["WAV", "FLAC", "OGG"])
def test_decoding_bytes_equals_reading_the_file(
    tmp_path: Path, sample_rate: int, subtype: str, channels: int, container: str
) -> None:
    signal = np.stack([_sine(700.0, sample_rate, 0.3)] * channels, axis=1)
    path = tmp_path / f"clip.{container.lower()}"
    subtype = {"WAV": subtype, "FLAC": "PCM_16", "OGG": "VORBIS"}[container]
    sf.write(path, signal, sample_rate, subtype=subtype, format=container)
    assert torch.equal(decode_audio(path.read_bytes()), read_audio(path))


def test_decoding_bytes_checks_length_from_the_header_and_names_the_source() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, _sine(440.0, 8000, 3.0), 8000, format="WAV")
    data = buffer.getvalue()
    assert len(decode_audio(data, max_seconds=3.0)) == 48000
    with pytest.raises(AudioTooLongError, match=r"^the upload: the audio is over 2.5 s$"):
        decode_audio(data, max_seconds=2.5)
    for bad, problem in ((b"", "empty"), (data[:30], "cannot decode"), (b"junk" * 100, "cannot decode")):
        with pytest.raises(AudioError, match=rf"^clip 7: .*{problem}") as err:
            decode_audio(bad, name="clip 7")
        assert "\n" not in str(err.value)
