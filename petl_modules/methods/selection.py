"""Methods that add nothing and only choose which pretrained tensors train: linear probing, full
fine-tuning and BitFit.
"""

from __future__ import annotations

from torch import nn

from ..backbones.base import Backbone, OptionError
from .base import Method, flag


class LinearProbing(Method):
    """Only the head (and the final LayerNorm, if the model is set to train it) learns."""

    name = "linear"

    def apply(self, backbone: Backbone) -> None:
        """Nothing to add: the backbone stays frozen."""


class FullFineTuning(Method):
    """Every backbone tensor trains, except the always-frozen ones (Wav2Vec2's CNN feature encoder).

    `num_trainable_layers` keeps all but the last N encoder layers frozen (the papers' Wav2Vec2
    "full fine-tuning" trains the last 3, the YAML default for Wav2Vec2); None trains them all,
    embeddings included (the default for AST). The backbone runs in training mode, as the reference's
    `model.train()`: dropout, and on Wav2Vec2 the checkpoint's time masking and LayerDrop.
    """

    name = "full_ft"
    trains_backbone = True

    def __init__(self, num_trainable_layers: int | None = None) -> None:
        if num_trainable_layers is not None and (
            isinstance(num_trainable_layers, bool)
            or not isinstance(num_trainable_layers, int)
            or num_trainable_layers < 1
        ):
            raise OptionError(f"num_trainable_layers must be null or a positive integer; got {num_trainable_layers!r}")
        self.num_trainable_layers = num_trainable_layers

    def apply(self, backbone: Backbone) -> None:
        if self.num_trainable_layers is None:
            trainable = [backbone.model]
        else:
            trainable = list(backbone.layers)[-self.num_trainable_layers :]
            if backbone.final_norm is not None:
                trainable.append(backbone.final_norm)
        for module in trainable:
            module.requires_grad_(True)
        for parameter in backbone.always_frozen():
            parameter.requires_grad_(False)


class BitFit(Method):
    """BitFit (Ben Zaken et al., 2022): every bias of the encoder's Linear and LayerNorm layers.

    The final LayerNorm, when the model trains it, trains its bias only, as in the reference (biases
    only); `train_final_norm_weight` trains its weight too.
    """

    name = "bitfit"

    def __init__(self, train_final_norm_weight: bool = False) -> None:
        self.train_final_norm_weight = flag("train_final_norm_weight", train_final_norm_weight)

    def apply(self, backbone: Backbone) -> None:
        for module in backbone.encoder.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.requires_grad_(True)

    def final_norm_parameters(self, norm: nn.Module) -> list[nn.Parameter]:
        return list(norm.parameters()) if self.train_final_norm_weight else [norm.bias]
