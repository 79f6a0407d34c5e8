"""Backbones with random weights saved in Hugging Face format: for tests, the demo and parameter counts.

`base` is the papers' size (the hub checkpoints' configs); `tiny` is a few-layer model for CPU tests.
The folders load exactly like a downloaded checkpoint (`--backbone_source=DIR`). Each file appears whole
(built in a staging folder beside the folder, then renamed into place) with the mode the umask gives
(0666 less the umask; a new folder 0777 less the umask), so a backbone in a shared folder is readable by all
the umask allows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    ASTConfig,
    ASTModel,
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from .atomic import follow_umask, staging_folder, write_text_atomic
from .backbones.ast import AUDIOSET_MEAN, AUDIOSET_STD

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_CNN = dict(
    conv_dim=(32, 32),
    conv_stride=(5, 4),
    conv_kernel=(10, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
# Data2Vec-audio's positional embedding is a stack of `num_conv_pos_embeddings` convolutions of
# `conv_pos_kernel_size` (base: 5 of 19): two small ones.
TINY_DATA2VEC_POSITIONS = dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=5)
# kind -> (config class, model class): what `python -m petl_modules.random_backbones KIND` writes.
KINDS = {
    "ast": (ASTConfig, ASTModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "data2vec": (Data2VecAudioConfig, Data2VecAudioModel),
    "wavlm": (WavLMConfig, WavLMModel),  # tiny: WavLM's 320 relative-position buckets up to 800 frames, as base
    # The hub's layout (the encoder under model.encoder); the backbone keeps the encoder alone.
    "whisper": (WhisperConfig, WhisperForConditionalGeneration),
}
# openai/whisper-base (WhisperConfig's defaults are whisper-tiny's): encoder and decoder of 6 layers.
WHISPER_BASE = dict(
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
)
# A tiny encoder with base's 30 s window (1500 positions) and 80 mel bins; a one-layer decoder with a 64-token
# vocabulary (its special tokens inside it), which the backbone leaves behind.
TINY_WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    vocab_size=64,
    max_target_positions=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=3,
    suppress_tokens=[],
    begin_suppress_tokens=[],
)


def backbone_config(kind: str, size: str = "tiny", **overrides):
    """The config of a `kind` backbone at `size` ("tiny" or "base"), with `overrides` applied."""
    if size not in ("tiny", "base"):
        raise ValueError(f"size must be tiny or base; got {size!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "whisper":
        options = WHISPER_BASE if size == "base" else TINY_WHISPER
    elif size == "base":
        options = {}
    elif kind == "ast":
        options = dict(TINY, max_length=1024)
    elif kind == "data2vec":
        options = {**TINY, **TINY_CNN, **TINY_DATA2VEC_POSITIONS}
    else:
        options = dict(TINY, **TINY_CNN)
    return KINDS[kind][0](**{**options, **overrides})


def ast_preprocessor_config(config, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> dict:
    """An AST checkpoint's preprocessor_config.json: the fbank normalisation (mean, std) and input size."""
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "mean": mean,
        "std": std,
        "sampling_rate": 16000,
        "num_mel_bins": config.num_mel_bins,
        "max_length": config.max_length,
    }


def write_random_checkpoint(kind: str, folder: str | Path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised `kind` backbone (and its preprocessor config) to `folder`; returns `folder`.

    Invariants: an absent `folder` appears whole (one rename of its staging folder); in an existing one each
    written file replaces its namesake atomically and other files stay. Files get 0666 & ~umask, a new
    folder 0777 & ~umask (transformers writes model.safetensors 0600). A failed write leaves no staging folder.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    config = backbone_config(kind, size, **overrides)
    model = KINDS[kind][1](config)
    if kind == "ast":  # the hub checkpoint's embeddings are trained, never zero: make ours non-zero too
        with torch.no_grad():
            model.embeddings.position_embeddings.normal_(std=0.02)
            model.embeddings.cls_token.normal_(std=0.02)
            model.embeddings.distillation_token.normal_(std=0.02)
    if kind == "ast":
        preprocessor = ast_preprocessor_config(config)
    elif kind == "whisper":
        preprocessor = WhisperFeatureExtractor(feature_size=config.num_mel_bins).to_dict()
    else:
        preprocessor = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": True}
        preprocessor["sampling_rate"] = 16000
    staging = staging_folder(folder)
    try:
        model.save_pretrained(staging)
        write_text_atomic(staging / "preprocessor_config.json", json.dumps(preprocessor, indent=2))
        follow_umask(staging)
        if folder.is_dir():
            for entry in staging.iterdir():
                os.replace(entry, folder / entry.name)
            staging.rmdir()
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=tuple(KINDS))
    parser.add_argument("folder")
    parser.add_argument("--size", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_checkpoint(args.kind, args.folder, args.size, args.seed))


if __name__ == "__main__":
    main()
