"""Pretrained backbones, chosen by name from HyperPyYAML (`backbone: ast | wav2vec2 | hubert | data2vec | wavlm`)."""

from __future__ import annotations

from .ast import DEFAULT_AST_SOURCE, ASTBackbone, FbankFrontEnd
from .base import Backbone, ForwardState
from .loading import BackboneLoadError
from .wav2vec2 import DEFAULT_WAV2VEC2_SOURCE, Wav2Vec2Backbone
from .wavlm import DEFAULT_WAVLM_SOURCE, WavLMBackbone

BACKBONES = ("ast", "wav2vec2", "hubert", "data2vec", "wavlm")
# The checkpoint each kind loads when no `backbone_source` is given (the papers' ones for AST and Wav2Vec2).
DEFAULT_SOURCES = {
    "ast": DEFAULT_AST_SOURCE,
    "wav2vec2": DEFAULT_WAV2VEC2_SOURCE,
    "hubert": "facebook/hubert-base-ls960",
    "data2vec": "facebook/data2vec-audio-base",
    "wavlm": DEFAULT_WAVLM_SOURCE,
}
# The Wav2Vec2 family: the same front end and layer layout, hence the same defaults (`per_backbone`'s
# `wav2vec2` value): no LayerNorm trains, the head is one Linear on the mean-pooled last layer.
WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "data2vec", "wavlm")


def build_backbone(
    kind: str = "ast", source: str | None = None, target_length: int = 1024, activation_checkpointing: bool = False
) -> Backbone:
    """The backbone `kind` from `source` (None: `DEFAULT_SOURCES[kind]`, a hub checkpoint).

    `target_length` (fbank frames) applies to AST only; the waveform encoders take any length.
    `activation_checkpointing` recomputes each encoder layer in the backward pass (long inputs).
    """
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"activation_checkpointing must be True or False; got {activation_checkpointing!r}")
    if kind not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got '{kind}'")
    source = source or DEFAULT_SOURCES[kind]
    if kind == "ast":
        backbone = ASTBackbone(source, target_length=target_length)
    elif kind == "wavlm":
        backbone = WavLMBackbone(source)
    else:
        backbone = Wav2Vec2Backbone(source, model_type=kind)
    backbone.activation_checkpointing = activation_checkpointing
    return backbone


def per_backbone(backbone: str, ast, wav2vec2):
    """The value for `backbone`: `ast` for AST, `wav2vec2` for the Wav2Vec2 family (`WAV2VEC2_FAMILY`).

    How the YAML files state a default that depends on the backbone (the reference's own differ):

        number_of_epochs: !apply:petl_modules.backbones.per_backbone {backbone: !ref <backbone>, ast: 75, wav2vec2: 50}

    The key stays an ordinary key: `--number_of_epochs=30` replaces the whole expression.
    """
    if backbone == "ast":
        return ast
    if backbone in WAV2VEC2_FAMILY:
        return wav2vec2
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got '{backbone}'")


__all__ = [
    "ASTBackbone",
    "Backbone",
    "BackboneLoadError",
    "BACKBONES",
    "DEFAULT_AST_SOURCE",
    "DEFAULT_SOURCES",
    "DEFAULT_WAV2VEC2_SOURCE",
    "FbankFrontEnd",
    "ForwardState",
    "WAV2VEC2_FAMILY",
    "Wav2Vec2Backbone",
    "WavLMBackbone",
    "build_backbone",
    "per_backbone",
]
