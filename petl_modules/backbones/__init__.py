"""Pretrained backbones, chosen by name from HyperPyYAML (`backbone: ast | wav2vec2 | hubert`)."""

from __future__ import annotations

from .ast import DEFAULT_AST_SOURCE, ASTBackbone, FbankFrontEnd
from .base import Backbone, ForwardState
from .loading import BackboneLoadError
from .wav2vec2 import DEFAULT_WAV2VEC2_SOURCE, Wav2Vec2Backbone

BACKBONES = ("ast", "wav2vec2", "hubert")


def build_backbone(
    kind: str = "ast", source: str | None = None, target_length: int = 1024, activation_checkpointing: bool = False
) -> Backbone:
    """The backbone `kind` from `source` (None: the papers' hub checkpoint for that kind).

    `target_length` (fbank frames) applies to AST only; Wav2Vec2 and HuBERT take any length.
    `activation_checkpointing` recomputes each encoder layer in the backward pass (long inputs).
    """
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"activation_checkpointing must be True or False; got {activation_checkpointing!r}")
    if kind == "ast":
        backbone = ASTBackbone(source or DEFAULT_AST_SOURCE, target_length=target_length)
    elif kind in ("wav2vec2", "hubert"):
        backbone = Wav2Vec2Backbone(source or DEFAULT_WAV2VEC2_SOURCE, model_type=kind)
    else:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got '{kind}'")
    backbone.activation_checkpointing = activation_checkpointing
    return backbone


def per_backbone(backbone: str, ast, wav2vec2):
    """The value for `backbone`: `ast` for AST, `wav2vec2` for Wav2Vec2 and HuBERT (same family).

    How the YAML files state a default that depends on the backbone (the reference's own differ):

        number_of_epochs: !apply:petl_modules.backbones.per_backbone {backbone: !ref <backbone>, ast: 75, wav2vec2: 50}

    The key stays an ordinary key: `--number_of_epochs=30` replaces the whole expression.
    """
    if backbone == "ast":
        return ast
    if backbone in ("wav2vec2", "hubert"):
        return wav2vec2
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got '{backbone}'")


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
    "per_backbone",
]
