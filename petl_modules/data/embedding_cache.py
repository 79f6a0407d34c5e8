"""Per-file pooled embeddings of a frozen backbone, on disk: linear probing reads them after the first epoch.

A `FeatureCache` whose features are `linear_cached.pooled_features` of one file (see that module for why
training the final LayerNorm and the head from them is exact). The folder's key holds everything the vector
depends on: the backbone class, its source (a local folder by path and by the size and modification time of
its files, so rewritten weights are a new key; a hub id by name), the input settings, the pooling and the
norm's eps. Entries are per file (path, size, modification time) and written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..linear_cached import check_cacheable, head_norm, pooled_features
from ..model import PETLModel
from .feature_cache import FeatureCache


def source_identity(source: str) -> dict:
    """A hub id as is; a local folder as its resolved path plus (size, mtime) of every file in it."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"hub_id": source}
    files = sorted(item for item in path.iterdir() if item.is_file())
    return {
        "folder": str(path.resolve()),
        "files": {item.name: [item.stat().st_size, item.stat().st_mtime_ns] for item in files},
    }


def embedding_settings(model: PETLModel, backbone_source: str) -> dict:
    """Everything a cached vector depends on besides the audio file (the cache folder's key)."""
    backbone = model.backbone
    norm = head_norm(model)
    settings = {
        "features": "pooled_normalised_last_layer",
        "backbone": type(backbone).__name__,
        "source": source_identity(backbone_source),
        "pooling": model.head.pooling,
        "norm_eps": None if norm is None else norm.eps,
    }
    front_end = getattr(backbone, "front_end", None)
    if front_end is not None:
        settings["front_end"] = front_end.settings()
    if hasattr(backbone, "normalize_waveform"):
        settings["normalize_waveform"] = backbone.normalize_waveform
    return settings


def embedding_cache(folder: str | Path, model: PETLModel, backbone_source: str) -> FeatureCache:
    """`cache(wav_path)` -> the file's pooled vector (hidden,), computed by the backbone on first use.

    Raises ValueError when the model cannot train exactly from cached vectors (not linear probing, or
    SpecAugment on). The backbone runs on the model's device; vectors are stored on the CPU.
    """
    check_cacheable(model)
    device = next(model.parameters()).device

    def extract(wav: torch.Tensor) -> torch.Tensor:
        return pooled_features(model, wav[None].to(device))[0].cpu()

    return FeatureCache(folder, extract, embedding_settings(model, backbone_source))
