"""Linear probing from cached features: the frozen backbone runs once per file, later epochs read one vector.

Exact, not an approximation. The head is LayerNorm -> pooling -> Linear, and the pooling (mean over the real
tokens, [CLS], or the mean of [CLS] and [DIST]) is linear in the tokens. With z_t the token normalised
without the affine part (the LayerNorm's own eps),

    pool_t(gamma * z_t + beta) = gamma * pool_t(z_t) + beta,

so one vector per file, pool(z), gives the logits of the full forward and the same gradients for gamma, beta
and the Linear: the last LayerNorm before the head (the backbone's final one, or the head's own with
`head_norm`) and the Linear train from it. Without any LayerNorm (the reference's Wav2Vec2 head) the vector
is the pooled last layer itself. Valid only while everything before that LayerNorm is frozen: linear probing
(the backbone stays in eval mode) on deterministic input (no SpecAugment, no augmentation), and a final
LayerNorm that trains only when it is the last one; anything else is an error.

A vector is what the model computes for the file alone. AST and LayerNorm-CNN Wav2Vec2 give the same in a
padded batch; base Wav2Vec2 checkpoints (GroupNorm CNN) normalise over the padded input, so their batched
forward differs slightly from the file alone (see `Wav2Vec2Backbone`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .model import PETLModel


def head_norm(model: PETLModel) -> nn.LayerNorm | None:
    """The last LayerNorm applied to every token before pooling: the head's own, else the backbone's final one."""
    return model.head.norm if model.head.norm is not None else model.backbone.final_norm


def cache_blocker(model: PETLModel, augmentation: bool = False) -> str | None:
    """None when `model` trains exactly from cached vectors (see the module doc), else why not, in one line."""
    if model.method.name != "linear":
        return (
            f"cached features need method linear (linear probing); {model.method.name} changes the backbone's "
            "output as it trains: set cache_embeddings: False"
        )
    if augmentation:
        return (
            "cached features need deterministic input: set spec_augment: False (and no augmentation) "
            "or cache_embeddings: False"
        )
    final_norm = model.backbone.final_norm
    if model.head.norm is not None and final_norm is not None and any(p.requires_grad for p in final_norm.parameters()):
        return (
            "cached features with head_norm: True on a backbone with a final LayerNorm need train_final_norm: False "
            "(two trainable LayerNorms in a row do not reduce to one vector per file)"
        )
    return None


def check_cacheable(model: PETLModel, augmentation: bool = False) -> None:
    """Raise a one-line ValueError unless `model` trains exactly from cached vectors (see the module doc)."""
    reason = cache_blocker(model, augmentation)
    if reason is not None:
        raise ValueError(reason)


def recipe_cache_blocker(model: PETLModel, cache_embeddings: bool, spec_augment: bool) -> str | None:
    """None when a recipe run trains from cached vectors, else why the backbone runs every step.

    The recipes' rule, shared by the data pipeline (`recipe.input_loader`) and the Brain: the option
    `cache_embeddings` is on and `cache_blocker` finds nothing; SpecAugment counts only on AST (the Brain
    skips it on waveform backbones).
    """
    if not cache_embeddings:
        return "cache_embeddings: False"
    augmented = bool(spec_augment) and model.backbone.front_end is not None
    return cache_blocker(model, augmented)


class PooledOrFull(nn.Module):
    """`model` behind one forward: `(vectors, pooled=True)` -> `logits_from_pooled`, else the full forward.

    The recipes' Brain trains through it when batches may hold cached vectors, so that DDP (which wraps the
    module the Brain calls) sees both paths and averages the head's gradients either way.
    """

    def __init__(self, model: PETLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None, pooled: bool = False) -> torch.Tensor:
        return logits_from_pooled(self.model, inputs) if pooled else self.model(inputs, lengths)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, each restored to its own mode afterwards."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes.items():
            sub.training = mode


@torch.no_grad()
def pooled_features(model: PETLModel, inputs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The cacheable vectors (batch, hidden): pooled last-layer tokens, normalised without affine.

    `inputs` and `lengths` are what `model(inputs, lengths)` takes (waveforms, or AST fbank features).
    """
    check_cacheable(model)
    with _eval_mode(model.backbone):
        tokens, mask = model.backbone(inputs, lengths)
        if model.head.norm is not None and model.backbone.final_norm is not None:
            tokens = model.backbone.final_norm(tokens)  # frozen (check_cacheable): part of the cached input
    norm = head_norm(model)
    if norm is not None:
        tokens = F.layer_norm(tokens, norm.normalized_shape, eps=norm.eps)
    return model.head.pool(tokens, mask)


def logits_from_pooled(model: PETLModel, pooled: torch.Tensor) -> torch.Tensor:
    """Logits (batch, classes) from `pooled_features` vectors: the LayerNorm's affine part, then the Linear."""
    norm = head_norm(model)
    if norm is not None and norm.weight is not None:
        pooled = pooled * norm.weight
    if norm is not None and norm.bias is not None:
        pooled = pooled + norm.bias
    return model.head.linear(pooled)
