"""Tiny random backbones in Hugging Face format, and models built on them, for the unit tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from petl_modules.backbones import build_backbone
from petl_modules.methods import METHODS
from petl_modules.model import PETLModel
from petl_modules.random_backbones import write_random_checkpoint

# Kinds of tiny checkpoints: post-LN Wav2Vec2 with a GroupNorm CNN (like base) and a pre-LN one with a
# LayerNorm CNN (like large, fully padding-invariant).
CHECKPOINTS = {
    "ast": ("ast", {}),
    "wav2vec2": ("wav2vec2", {}),
    "wav2vec2_stable": ("wav2vec2", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),
    "data2vec": ("data2vec", {}),  # Wav2Vec2's post-LN layers, LayerNorm CNN, two stacked positional convolutions
    "wavlm": ("wavlm", {}),  # post-LN, GroupNorm CNN (like wavlm-base-plus)
    "wavlm_stable": ("wavlm", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),  # like wavlm-large
    "whisper": ("whisper", {}),  # pre-LN, 80 mel bins, the 30 s window (1500 positions)
}
# A checkpoint's config.json `model_type` -> its `backbone` name.
KINDS = {
    "audio-spectrogram-transformer": "ast",
    "wav2vec2": "wav2vec2",
    "hubert": "hubert",
    "data2vec-audio": "data2vec",
    "wavlm": "wavlm",
    "whisper": "whisper",
}
# AST frames: 9 time columns x 12 frequency rows + 2 special tokens; Whisper (clip window): 50 tokens.
TARGET_LENGTH = 100


def write_checkpoints(root: Path) -> dict[str, Path]:
    return {
        name: write_random_checkpoint(kind, root / name, **options) for name, (kind, options) in CHECKPOINTS.items()
    }


def build_model(
    checkpoint: Path, method: str = "linear", num_classes: int = 5, seed: int = 0, pooling: str = "mean", **options
) -> PETLModel:
    """A PETLModel on a tiny checkpoint (its kind read from its config.json); the seed fixes the method's and
    head's initialisation."""
    kind = KINDS[json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]]
    backbone = build_backbone(kind, str(checkpoint), target_length=TARGET_LENGTH)
    torch.manual_seed(seed)
    return PETLModel(backbone, METHODS[method](**options), num_classes, pooling=pooling)


def waveforms(batch: int = 3, seconds: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random waveforms with unequal relative lengths (the first one full)."""
    generator = torch.Generator().manual_seed(seed)
    wavs = torch.randn(batch, int(16000 * seconds), generator=generator) * 0.1
    lens = torch.linspace(1.0, 0.6, batch)
    return wavs, lens
