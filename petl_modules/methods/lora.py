"""LoRA (Hu et al., 2022) on the attention projections, with merge/unmerge for inference."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbones.base import Backbone, OptionError
from .base import Method, PETLModule, bottleneck_size, choice, positive_int, probability

PROJECTIONS = ("q", "k", "v", "o")


class LoRAUpdate(PETLModule):
    """The low-rank update scale * B(A(dropout(x))): A random (as PEFT), B zero, so it starts at zero.

    `scale` is the effective factor (what an export records): see `LoRA` for the two conventions.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale


class LoRALinear(nn.Module):
    """A frozen Linear plus its LoRA update; `merge()` folds the update into the weight for inference."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora = LoRAUpdate(base.in_features, base.out_features, rank, scale, dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        return output if self.merged else output + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.lora.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.lora.delta_weight().to(self.base.weight.dtype)
            self.merged = False


SCALINGS = ("reference", "peft")


class LoRA(Method):
    """LoRA with rank = hidden / `reduction_rate` (papers: 768 / 64 = 12).

    `scaling`: "reference" (default) scales the update by alpha / reduction_rate, as the papers' code does
    (`scaling = ALPHA / RANK` with the reduction rate passed as RANK: 8 / 64 = 0.125); "peft" by
    alpha / rank, the convention of the LoRA paper and PEFT (8 / 12 = 0.667 on a 768-wide model).
    """

    name = "lora"

    def __init__(
        self,
        reduction_rate: int = 64,
        alpha: float = 8,
        targets: tuple[str, ...] | list[str] = ("q", "v"),
        dropout: float = 0.0,
        scaling: str = "reference",
    ) -> None:
        self.reduction_rate = positive_int("reduction_rate", reduction_rate)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise OptionError(f"alpha must be a positive number; got {alpha!r}")
        self.alpha = alpha
        targets = tuple(targets)
        unknown = [target for target in targets if target not in PROJECTIONS]
        if not targets or unknown:
            raise OptionError(f"targets must be a non-empty list of {', '.join(PROJECTIONS)}; got {list(targets)}")
        self.targets = targets
        self.dropout = probability("dropout", dropout)
        self.scaling = choice("scaling", scaling, SCALINGS)

    def scale(self, rank: int) -> float:
        """The factor of the update for a given rank."""
        return self.alpha / (self.reduction_rate if self.scaling == "reference" else rank)

    def apply(self, backbone: Backbone) -> None:
        rank = bottleneck_size(backbone.hidden_size, self.reduction_rate)
        for layer in backbone.layers:
            attention = getattr(layer, backbone.attention_name)
            for target in self.targets:
                name = backbone.projection_names[target]
                setattr(attention, name, LoRALinear(getattr(attention, name), rank, self.scale(rank), self.dropout))
