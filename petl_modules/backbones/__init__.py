"""Pretrained backbones, chosen by name from HyperPyYAML (`backbone: ast | wav2vec2 | ... | whisper`: `BACKBONES`)."""

from __future__ import annotations

from .ast import DEFAULT_AST_SOURCE, ASTBackbone, FbankFrontEnd
from .base import Backbone, ForwardState
from .loading import BackboneLoadError
from .wav2vec2 import DEFAULT_WAV2VEC2_SOURCE, Wav2Vec2Backbone
from .wavlm import DEFAULT_WAVLM_SOURCE, WavLMBackbone
from .whisper import DEFAULT_WHISPER_SOURCE, WINDOWS, WhisperBackbone

BACKBONES = ("ast", "wav2vec2", "hubert", "data2vec", "wavlm", "whisper")
# The checkpoint each kind loads when no `backbone_source` is given (the papers' ones for AST and Wav2Vec2).
DEFAULT_SOURCES = {
    "ast": DEFAULT_AST_SOURCE,
    "wav2vec2": DEFAULT_WAV2VEC2_SOURCE,
    "hubert": "facebook/hubert-base-ls960",
    "data2vec": "facebook/data2vec-audio-base",
    "wavlm": DEFAULT_WAVLM_SOURCE,
    "whisper": DEFAULT_WHISPER_SOURCE,
}
# The Wav2Vec2 family: the same front end and layer layout, hence the same defaults (`per_backbone`'s
# `wav2vec2` value): no LayerNorm trains, the head is one Linear on the mean-pooled last layer.
WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "data2vec", "wavlm")
# Backbones whose defaults are the Wav2Vec2 path's (the reference knows AST and Wav2Vec2 only): the family, and
# the Whisper encoder (pre-LN like AST, but nothing in its architecture asks for AST's trained norms).
WAV2VEC2_DEFAULTS = (*WAV2VEC2_FAMILY, "whisper")


def build_backbone(
    kind: str = "ast",
    source: str | None = None,
    target_length: int = 1024,
    activation_checkpointing: bool = False,
    whisper_window: str = "clip",
) -> Backbone:
    """The backbone `kind` from `source` (None: `DEFAULT_SOURCES[kind]`, a hub checkpoint).

    `target_length` (10 ms frames) applies to the backbones with a front end: AST, and Whisper with
    `whisper_window: clip` (`30s`: Whisper's 3000-frame window); the waveform encoders take any length.
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
    elif kind == "whisper":
        backbone = WhisperBackbone(source, target_length=target_length, window=whisper_window)
    else:
        backbone = Wav2Vec2Backbone(source, model_type=kind)
    backbone.activation_checkpointing = activation_checkpointing
    return backbone


def per_backbone(backbone: str, ast, wav2vec2):
    """The value for `backbone`: `ast` for AST, `wav2vec2` for the others (`WAV2VEC2_DEFAULTS`: the Wav2Vec2
    family and Whisper).

    How the YAML files state a default that depends on the backbone (the reference's own differ):

        number_of_epochs: !apply:petl_modules.backbones.per_backbone {backbone: !ref <backbone>, ast: 75, wav2vec2: 50}

    The key stays an ordinary key: `--number_of_epochs=30` replaces the whole expression.
    """
    if backbone == "ast":
        return ast
    if backbone in WAV2VEC2_DEFAULTS:
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
    "DEFAULT_WHISPER_SOURCE",
    "FbankFrontEnd",
    "ForwardState",
    "WAV2VEC2_DEFAULTS",
    "WAV2VEC2_FAMILY",
    "WINDOWS",
    "Wav2Vec2Backbone",
    "WavLMBackbone",
    "WhisperBackbone",
    "build_backbone",
    "per_backbone",
]
