"""Adapter blocks: the small networks that adapters and mixtures of adapters are made of.

Every block maps (batch, tokens, hidden) -> (batch, tokens, hidden) and starts as the zero function
(last projection zero-initialised), so inserting it leaves the pretrained model's output unchanged.
Initialisation happens here, after the backbone is loaded, so no transformers version can skip or redo it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import PETLModule, choice, positive_int

BLOCKS = ("bottleneck", "conformer")


def _init_down(linear: nn.Linear) -> None:
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.bias)


def _init_zero(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class BottleneckBlock(PETLModule):
    """down-projection -> GELU -> up-projection (Houlsby et al., 2019)."""

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.activation = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        _init_down(self.down)
        _init_zero(self.up)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(self.activation(self.down(x)))


class ConformerBlock(PETLModule):
    """The papers' Conformer adapter: the convolution module of the Conformer as a bottleneck.

    LayerNorm -> pointwise to 2b -> GLU -> depthwise conv (kernel k) along tokens -> BatchNorm -> SiLU ->
    pointwise back to hidden. Pointwise convolutions are Linear layers (same function, faster).
    The depthwise convolution keeps the token count (PyTorch's `padding="same"`, as the reference: any k >= 1;
    an even k pads one more token on the right than on the left; the paper uses k = 8 on ESC-50 and
    UrbanSound8K). Padded tokens are zeroed before it, so they never leak into real ones.
    """

    def __init__(self, hidden_size: int, bottleneck: int, kernel_size: int = 31) -> None:
        super().__init__()
        kernel_size = positive_int("kernel_size", kernel_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.pointwise_in = nn.Linear(hidden_size, 2 * bottleneck)
        self.glu = nn.GLU(dim=-1)
        # "same" padding: (k - 1) // 2 zeros on the left, k // 2 on the right (written out for even k, for which
        # PyTorch's padding="same" warns at every call).
        self.same_padding = ((kernel_size - 1) // 2, kernel_size // 2)
        odd = kernel_size % 2 == 1
        self.depthwise = nn.Conv1d(
            bottleneck, bottleneck, kernel_size, padding=kernel_size // 2 if odd else 0, groups=bottleneck
        )
        self.batch_norm = nn.BatchNorm1d(bottleneck)
        self.activation = nn.SiLU()
        self.pointwise_out = nn.Linear(bottleneck, hidden_size)
        _init_down(self.pointwise_in)
        _init_zero(self.pointwise_out)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.glu(self.pointwise_in(self.norm(x)))
        if padding_mask is not None:
            h = h * padding_mask[..., None]
        h = h.transpose(1, 2)
        if self.depthwise.padding == (0,) and self.depthwise.kernel_size[0] > 1:
            h = F.pad(h, self.same_padding)
        h = self.batch_norm(self.depthwise(h))
        return self.pointwise_out(self.activation(h).transpose(1, 2))


def make_block(kind: str, hidden_size: int, bottleneck: int, kernel_size: int = 31) -> PETLModule:
    """An adapter block by name: "bottleneck" or "conformer"."""
    kind = choice("adapter_block", kind, BLOCKS)
    if kind == "bottleneck":
        return BottleneckBlock(hidden_size, bottleneck)
    return ConformerBlock(hidden_size, bottleneck, kernel_size)
