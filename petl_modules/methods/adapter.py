"""Bottleneck and Conformer adapters beside (parallel) or after (sequential) the MHSA / FFN sub-layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..backbones.base import Backbone, ForwardState, OptionError
from .base import Method, bottleneck_size, choice, flag, positive_int
from .blocks import BLOCKS, make_block

SUBLAYERS = ("attention", "ffn")


class AdaptedSublayer(nn.Module):
    """A frozen sub-layer with a module beside it (parallel) or after it (sequential).

    Parallel: out = sublayer(x) + m(x), with x the sub-layer's own input (after its LayerNorm in
    pre-LN models). Sequential: out = m(sublayer(x)). With `residual`, m(h) becomes m(h) + h.
    The module's output enters the residual stream exactly once: through the sub-layer's output.
    """

    def __init__(
        self, sublayer: nn.Module, module: nn.Module, parallel: bool, residual: bool, state: ForwardState
    ) -> None:
        super().__init__()
        self.sublayer = sublayer
        self.module = module
        self.parallel = parallel
        self.residual = residual
        self.state = state

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.sublayer(hidden_states, *args, **kwargs)
        main = output[0] if isinstance(output, tuple) else output
        source = hidden_states if self.parallel else main
        delta = self.module(source, self.state.padding_mask)
        if self.residual:
            delta = delta + source
        adapted = main + delta if self.parallel else delta
        return (adapted, *output[1:]) if isinstance(output, tuple) else adapted


def wrap_sublayers(
    backbone: Backbone,
    sublayers: tuple[str, ...],
    make_module: Callable[[], nn.Module],
    parallel: bool = True,
    residual: bool = False,
) -> None:
    """Wrap the named sub-layers ("attention", "ffn") of every layer with a fresh module each."""
    for layer in backbone.layers:
        for sublayer in sublayers:
            name = backbone.attention_name if sublayer == "attention" else backbone.ffn_name
            wrapped = AdaptedSublayer(getattr(layer, name), make_module(), parallel, residual, backbone.state)
            setattr(layer, name, wrapped)


def norms_of(backbone: Backbone, sublayers: tuple[str, ...]) -> list[nn.Module]:
    """The LayerNorm of each named sub-layer in every layer.

    The reference trains those of the adapted sub-layers beside its adapters and mixtures
    (`layernorm_after` for Pfeiffer, `layernorm_before` for MHSA, both for Houlsby) and leaves them out
    of the papers' percentages.
    """
    return [backbone.sublayer_norm(layer, sublayer) for layer in backbone.layers for sublayer in sublayers]


ADAPTER_LOCATIONS = {"FFN": ("ffn",), "MHSA": ("attention",)}  # where a Pfeiffer adapter sits


def sublayers_for(adapter_type: str, location: str = "FFN") -> tuple[str, ...]:
    """Pfeiffer: beside the FFN (the reference code) or beside MHSA (the MLSP paper's text); Houlsby: both."""
    if choice("adapter_type", adapter_type, ("Pfeiffer", "Houlsby")) == "Houlsby":
        return SUBLAYERS
    return ADAPTER_LOCATIONS[choice("adapter_location", location, tuple(ADAPTER_LOCATIONS))]


class Adapter(Method):
    """Adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) with a bottleneck or Conformer block.

    The papers' proposal, "0.29 % of the parameters": conformer block, reduction_rate 96, Pfeiffer, parallel.
    A Pfeiffer adapter sits beside the FFN (`location` "FFN", the reference code) or beside MHSA ("MHSA", the
    MLSP paper's text); a Houlsby adapter beside both. The LayerNorm of each adapted sub-layer is its
    `sublayer_norms` (the model's `train_sublayer_norms`).
    """

    name = "adapter"

    def __init__(
        self,
        reduction_rate: int = 96,
        adapter_type: str = "Pfeiffer",
        seq_or_par: str = "parallel",
        apply_residual: bool = False,
        adapter_block: str = "bottleneck",
        kernel_size: int = 31,
        location: str = "FFN",
    ) -> None:
        self.reduction_rate = positive_int("reduction_rate", reduction_rate)
        self.adapter_type = choice("adapter_type", adapter_type, ("Pfeiffer", "Houlsby"))
        self.location = choice("adapter_location", location, tuple(ADAPTER_LOCATIONS))
        if self.adapter_type == "Houlsby" and self.location != "FFN":
            raise OptionError(
                f"adapter_location {self.location} applies to Pfeiffer adapters; Houlsby ones sit beside MHSA and FFN"
            )
        self.seq_or_par = choice("seq_or_par", seq_or_par, ("parallel", "sequential"))
        self.apply_residual = flag("apply_residual", apply_residual)
        self.adapter_block = choice("adapter_block", adapter_block, BLOCKS)
        self.kernel_size = positive_int("kernel_size", kernel_size)

    @property
    def display_name(self) -> str:
        return "conformer_adapter" if self.adapter_block == "conformer" else self.name

    def apply(self, backbone: Backbone) -> None:
        bottleneck = bottleneck_size(backbone.hidden_size, self.reduction_rate)
        wrap_sublayers(
            backbone,
            sublayers_for(self.adapter_type, self.location),
            lambda: make_block(self.adapter_block, backbone.hidden_size, bottleneck, self.kernel_size),
            parallel=self.seq_or_par == "parallel",
            residual=self.apply_residual,
        )

    def sublayer_norms(self, backbone: Backbone) -> list[nn.Module]:
        return norms_of(backbone, sublayers_for(self.adapter_type, self.location))
