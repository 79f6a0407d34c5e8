"""Per-file pooled embeddings of a frozen backbone, on disk: linear probing reads them after the first epoch.

A `FeatureCache` whose features are `linear_cached.pooled_features` of one file (see that module for why
training the final LayerNorm and the head from them is exact). The folder's key holds everything the vector
depends on: the backbone class, a digest of its weights (so two backbones with the same source but other
weights, such as a random-init control, never share vectors), the input settings, the pooling and the
norm's eps. Entries are per file (path, size, modification time) and written atomically. The recipes fill
the cache before training (`fill`, batched, on the main process), keep the vectors in memory (`preload`)
and train from them (`recipe.build_datasets`, `training.PETLBrain`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from speechbrain.utils.data_utils import batch_pad_right
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import atomic_path
from ..linear_cached import check_cacheable, head_norm, pooled_features
from ..model import PETLModel
from .audio import read_audio
from .feature_cache import FeatureCache

logger = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-1 of a module's tensors (names, shapes, dtypes, bytes): the weights its outputs depend on.

    Keys the cache by the weights that ran, wherever they came from (a folder, the hub, a random init).
    """
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embedding_settings(model: PETLModel) -> dict:
    """Everything a cached vector depends on besides the audio file (the cache folder's key)."""
    backbone = model.backbone
    norm = head_norm(model)
    settings = {
        "features": "pooled_normalised_last_layer",
        "backbone": type(backbone).__name__,
        "weights": weights_digest(backbone.model),
        "pooling": model.head.pooling,
        "norm_eps": None if norm is None else norm.eps,
    }
    settings["input"] = backbone.input_settings()
    return settings


def padding_invariant(model: PETLModel) -> bool:
    """Whether a file's vector is the same alone and in a zero-padded batch (AST; LayerNorm-CNN Wav2Vec2)."""
    return model.backbone.padding_invariant


def _read_batch(paths: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    return paths, [read_audio(path) for path in paths]


class EmbeddingCache(FeatureCache):
    """`cache(wav_path)` -> the file's pooled vector (hidden,), computed by the backbone on first use.

    `fill(paths)` computes the missing vectors beforehand in batched forwards (eval mode, no gradients):
    zero-padded batches where that is exact (`padding_invariant`), else batches of files of equal length,
    so a vector is always what the model computes for the file alone. `preload(paths)` then keeps them in
    memory, so that training reads no file either. Raises ValueError when the model cannot
    train exactly from cached vectors (not linear probing, or SpecAugment on). Vectors are stored on the CPU.
    """

    def __init__(
        self,
        folder: str | Path,
        model: PETLModel,
        read_only: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        check_cacheable(model)
        self.model = model
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.in_memory: dict[str, torch.Tensor] = {}
        super().__init__(folder, self._extract, embedding_settings(model), read_only=read_only)

    def __call__(self, wav_path: str | Path) -> torch.Tensor:
        vector = self.in_memory.get(str(wav_path))
        return vector if vector is not None else super().__call__(wav_path)

    def preload(self, wav_paths: Iterable[str | Path]) -> None:
        """Keep the vectors of `wav_paths` in memory (hidden x 4 bytes each): epochs then open no file.

        Data loader workers inherit them (fork) or receive them with the loader (spawn).
        """
        self.in_memory = {path: self(path) for path in dict.fromkeys(str(path) for path in wav_paths)}

    def _extract(self, wav: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return pooled_features(self.model, wav[None].to(device))[0].cpu()

    def _batches(self, wavs: list[torch.Tensor]) -> list[list[int]]:
        """Positions of `wavs` that go through the backbone together."""
        if padding_invariant(self.model):
            return [list(range(len(wavs)))]
        by_length: dict[int, list[int]] = {}
        for position, wav in enumerate(wavs):
            by_length.setdefault(wav.shape[-1], []).append(position)
        return list(by_length.values())

    def fill(self, wav_paths: Iterable[str | Path], device: str | torch.device | None = None) -> int:
        """Compute and store every missing vector (on `device`, default the model's); how many were computed.

        A read-only cache computes nothing. The model returns to its own device afterwards. Logs how many
        vectors it computed and its wall time ("Embedding cache: N vectors computed in S s").
        """
        missing = [
            path
            for path in dict.fromkeys(str(path) for path in wav_paths)
            if not os.path.isfile(path) or not self.path_for(path).is_file()  # a missing file: read_audio says so
        ]
        if self.read_only or not missing:
            return 0
        home = next(self.model.parameters()).device
        device = torch.device(device) if device is not None else home
        loader = DataLoader(missing, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_read_batch)
        started = time.perf_counter()
        self.model.to(device)
        try:
            with tqdm(total=len(missing), desc="embedding cache", unit="file", disable=None) as bar:
                for paths, wavs in loader:
                    for group in self._batches(wavs):
                        padded, lengths = batch_pad_right([wavs[position] for position in group])
                        vectors = pooled_features(self.model, padded.to(device), lengths.to(device)).cpu()
                        for position, vector in zip(group, vectors):
                            with atomic_path(self.path_for(paths[position])) as tmp:
                                torch.save(vector.clone(), tmp)  # a clone: a row alone, not the batch's storage
                    bar.update(len(paths))
        finally:
            self.model.to(home)
        logger.info(
            "Embedding cache: %d vectors computed in %.3f s on %s", len(missing), time.perf_counter() - started, device
        )
        return len(missing)


def embedding_cache(folder: str | Path, model: PETLModel, **options) -> EmbeddingCache:
    """`EmbeddingCache(folder, model, **options)`: see there."""
    return EmbeddingCache(folder, model, **options)
