"""Mixtures of adapters beside MHSA and/or FFN: Dense-MoA and Soft-MoA (Cappellazzo et al., Interspeech 2024).

Dense-MoA runs every expert on every token and mixes them with a per-token softmax router.
Soft-MoA (Soft MoE, Puigcerver et al. 2024, applied to adapters) runs each expert on `num_slots` slots
only: a slot is a softmax-over-tokens mixture of the tokens (dispatch), and each token reads back a
softmax-over-(experts x slots) mixture of the slot outputs (combine). Its expert cost is independent of
the number of tokens, hence far cheaper than Dense-MoA on long inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from .adapter import SUBLAYERS, norms_of, wrap_sublayers
from .base import Method, PETLModule, bottleneck_size, choice, flag, positive_int
from .blocks import BLOCKS, make_block

LOCATIONS = {"MHSA": ("attention",), "FFN": ("ffn",), "both": SUBLAYERS}


class BottleneckExperts(PETLModule):
    """`num_experts` bottleneck adapters with stacked weights, so all run in two batched matmuls."""

    def __init__(self, num_experts: int, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden_size, bottleneck))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, bottleneck, hidden_size))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        bound = 1 / math.sqrt(hidden_size)  # nn.Linear's default range for the down-projection
        nn.init.uniform_(self.down_weight, -bound, bound)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-expert inputs (batch, experts, n, hidden) -> outputs of the same shape."""
        h = F.gelu(torch.einsum("bend,edh->benh", x, self.down_weight) + self.down_bias[:, None])
        return torch.einsum("benh,ehd->bend", h, self.up_weight) + self.up_bias[:, None]

    def mix(self, x: torch.Tensor, weights: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sum_e weights[..., e] * expert_e(x) for x (batch, tokens, hidden), without a per-expert output."""
        h = F.gelu(torch.einsum("btd,edh->bteh", x, self.down_weight) + self.down_bias)
        weighted = (h * weights[..., None]).flatten(2)  # (batch, tokens, experts * bottleneck)
        return weighted @ self.up_weight.flatten(0, 1) + weights @ self.up_bias


class BlockExperts(PETLModule):
    """`num_experts` independent adapter blocks (used for Conformer experts)."""

    def __init__(self, num_experts: int, make_expert) -> None:
        super().__init__()
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([expert(x[:, index]) for index, expert in enumerate(self.experts)], dim=1)

    def mix(self, x: torch.Tensor, weights: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return sum(weights[..., index, None] * expert(x, padding_mask) for index, expert in enumerate(self.experts))


def make_experts(block: str, num_experts: int, hidden_size: int, bottleneck: int, kernel_size: int) -> PETLModule:
    if choice("adapter_block", block, BLOCKS) == "bottleneck":
        return BottleneckExperts(num_experts, hidden_size, bottleneck)
    return BlockExperts(num_experts, lambda: make_block(block, hidden_size, bottleneck, kernel_size))


class DenseMixture(PETLModule):
    """Every expert on every token, mixed by a per-token softmax router."""

    def __init__(self, experts: PETLModule, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts)
        self.experts = experts

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.experts.mix(x, self.router(x).softmax(dim=-1), padding_mask)


class SoftMixture(PETLModule):
    """Soft MoE over adapter experts: dispatch = softmax over tokens, combine = softmax over experts x slots.

    With `normalize`, tokens and each column of Phi are L2-normalised over the feature axis and the
    logits multiplied by a learned scale (Soft MoE paper, section 2.3).
    """

    def __init__(
        self, experts: PETLModule, hidden_size: int, num_experts: int, num_slots: int, normalize: bool
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.normalize = normalize
        # Phi: (hidden, experts * slots), LeCun-normal as in Soft MoE.
        self.phi = nn.Parameter(torch.randn(hidden_size, num_experts * num_slots) / math.sqrt(hidden_size))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.experts = experts

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, experts * slots) token-slot affinities."""
        if not self.normalize:
            return x @ self.phi
        return self.scale * (F.normalize(x, dim=-1) @ F.normalize(self.phi, dim=0))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(x)
        token_logits = logits if padding_mask is None else logits.masked_fill(~padding_mask[..., None], float("-inf"))
        dispatch = token_logits.softmax(dim=1)  # over tokens: each slot is a convex mix of real tokens
        combine = logits.softmax(dim=-1)  # over experts x slots: each token a convex mix of slot outputs
        slots = torch.einsum("btn,btd->bnd", dispatch, x)
        slots = slots.unflatten(1, (self.num_experts, self.num_slots))
        outputs = self.experts(slots).flatten(1, 2)
        return torch.einsum("btn,bnd->btd", combine, outputs)


class _MixtureOfAdapters(Method):
    """Options shared by the mixtures; `sublayer_norms` are those of the adapted sub-layers."""

    def __init__(
        self,
        num_adapters: int = 7,
        reduction_rate: int = 128,
        location: str = "MHSA",
        adapter_block: str = "bottleneck",
        kernel_size: int = 31,
    ) -> None:
        self.num_adapters = positive_int("num_adapters", num_adapters)
        self.reduction_rate = positive_int("reduction_rate", reduction_rate)
        self.location = choice("location", location, LOCATIONS)
        self.adapter_block = choice("adapter_block", adapter_block, BLOCKS)
        self.kernel_size = positive_int("kernel_size", kernel_size)

    def _mixture(self, experts: PETLModule, hidden_size: int) -> PETLModule:
        raise NotImplementedError

    def apply(self, backbone: Backbone) -> None:
        hidden = backbone.hidden_size
        bottleneck = bottleneck_size(hidden, self.reduction_rate)

        def make_mixture() -> PETLModule:
            experts = make_experts(self.adapter_block, self.num_adapters, hidden, bottleneck, self.kernel_size)
            return self._mixture(experts, hidden)

        wrap_sublayers(backbone, LOCATIONS[self.location], make_mixture, parallel=True, residual=False)

    def sublayer_norms(self, backbone: Backbone) -> list[nn.Module]:
        return norms_of(backbone, LOCATIONS[self.location])


class DenseMoA(_MixtureOfAdapters):
    """Dense mixture of adapters, parallel to MHSA, FFN or both (Houlsby)."""

    name = "dense_moa"

    def _mixture(self, experts: PETLModule, hidden_size: int) -> PETLModule:
        return DenseMixture(experts, hidden_size, self.num_adapters)


class SoftMoA(_MixtureOfAdapters):
    """Soft mixture of adapters, parallel to MHSA, FFN or both (Houlsby)."""

    name = "soft_moa"

    def __init__(self, *, num_slots: int = 1, normalize: bool = False, **options) -> None:
        """Adds the Soft MoE options to the shared mixture ones.

        Args:
            num_slots: slots each expert processes; the expert cost is independent of the token count.
            normalize: L2-normalise tokens and Phi over the feature axis, with a learned logit scale.
            **options: the options every mixture takes (`num_adapters`, `reduction_rate`, `location`,
                `adapter_block`, `kernel_size`), with the defaults of `_MixtureOfAdapters`.
        """
        super().__init__(**options)
        self.num_slots = positive_int("num_slots", num_slots)
        self.normalize = flag("normalize", normalize)

    def _mixture(self, experts: PETLModule, hidden_size: int) -> PETLModule:
        return SoftMixture(experts, hidden_size, self.num_adapters, self.num_slots, self.normalize)
