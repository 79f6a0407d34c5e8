"""Deterministic input features computed once per audio file and kept on disk.

AST's fbank depends only on the file and the front end's settings, so every epoch after the first (and
every other run sharing the folder) reads it instead of decoding, resampling and transforming the audio.
Files are written atomically: a run killed mid-write never leaves a truncated feature behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import atomic_path, write_json_atomic
from .audio import read_audio


class FeatureCache:
    """`cache(wav_path)` -> features of that file, computed by `extract(waveform)` on first use.

    The folder name hashes `settings` (what the features depend on); a file's entry hashes its path, size
    and modification time, so changed audio is recomputed. A `read_only` cache (DDP ranks other than 0) reads
    what is there and computes the rest without writing.
    """

    def __init__(
        self,
        folder: str | Path,
        extract: Callable[[torch.Tensor], torch.Tensor],
        settings: dict,
        read_only: bool = False,
    ) -> None:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(folder) / digest
        self.extract = extract
        self.read_only = read_only
        if not read_only:
            write_json_atomic(self.folder / "settings.json", settings)  # says what these features are

    def path_for(self, wav_path: str | Path) -> Path:
        stat = os.stat(wav_path)
        key = f"{Path(wav_path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def __call__(self, wav_path: str | Path) -> torch.Tensor:
        if not os.path.isfile(wav_path):
            read_audio(wav_path)  # raises the AudioError that names the file
        cached = self.path_for(wav_path)
        if cached.is_file():
            return torch.load(cached, weights_only=True)
        features = self.extract(read_audio(wav_path)).contiguous()
        if self.read_only:
            return features
        with atomic_path(cached) as tmp:
            torch.save(features, tmp)
        return features
