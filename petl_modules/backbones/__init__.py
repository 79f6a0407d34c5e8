"""Pretrained backbones, chosen by name from HyperPyYAML (`backbone: ast | wav2vec2 | hubert`)."""

from __future__ import annotations

from .ast import DEFAULT_AST_SOURCE, ASTBackbone, FbankFrontEnd
from .base import Backbone, ForwardState
from .loading import BackboneLoadError
from .wav2vec2 import DEFAULT_WAV2VEC2_SOURCE, Wav2Vec2Backbone

BACKBONES = ("ast", "wav2vec2", "hubert")


def build_backbone(kind: str = "ast", source: str | None = None, target_length: int = 1024) -> Backbone:
    """The backbone `kind` from `source` (None: the papers' hub checkpoint for that kind).

    `target_length` (fbank frames) applies to AST only; Wav2Vec2 and HuBERT take any length.
    """
    if kind == "ast":
        return ASTBackbone(source or DEFAULT_AST_SOURCE, target_length=target_length)
    if kind in ("wav2vec2", "hubert"):
        return Wav2Vec2Backbone(source or DEFAULT_WAV2VEC2_SOURCE, model_type=kind)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got '{kind}'")


__all__ = [
    "ASTBackbone",
    "Backbone",
    "BackboneLoadError",
    "BACKBONES",
    "DEFAULT_AST_SOURCE",
    "DEFAULT_WAV2VEC2_SOURCE",
    "FbankFrontEnd",
    "ForwardState",
    "Wav2Vec2Backbone",
    "build_backbone",
]
