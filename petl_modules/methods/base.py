"""The contract between a tuning method and a backbone, and the checks shared by all methods."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..backbones.base import Backbone, OptionError


class PETLModule(nn.Module):
    """Marker for modules a method adds: they follow train()/eval() while the frozen backbone stays in eval."""


class Method:
    """A tuning method: decides what trains in a frozen backbone and injects its modules.

    `apply` runs once, after the backbone is frozen; it may unfreeze backbone tensors (BitFit, full
    fine-tuning) and add `PETLModule`s. `trains_backbone` says whether the backbone itself runs in
    training mode (dropout on), which only full fine-tuning does. `sublayer_norms` names the
    LayerNorms of the sub-layers the method adapts (the model trains them when `train_sublayer_norms`,
    as the reference does on AST, and counts them apart from the method, as the papers do);
    `final_norm_parameters` says which tensors of the final LayerNorm train when the model trains it.
    """

    name = "method"
    trains_backbone = False

    @property
    def display_name(self) -> str:
        """The name results, reports and exports give what was trained: `name`, or the variant's where the
        papers name one (the conformer adapter). Never a free-text key of the configuration.
        """
        return self.name

    def apply(self, backbone: Backbone) -> None:
        raise NotImplementedError

    def sublayer_norms(self, backbone: Backbone) -> list[nn.Module]:
        return []

    def final_norm_parameters(self, norm: nn.Module) -> list[nn.Parameter]:
        return list(norm.parameters())

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


def choice(key: str, value: str, allowed: Iterable[str]) -> str:
    """`value` matched case-insensitively against `allowed`; a clear error names the option otherwise."""
    allowed = tuple(allowed)
    for option in allowed:
        if isinstance(value, str) and value.lower() == option.lower():
            return option
    raise OptionError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def flag(key: str, value: bool) -> bool:
    """A real boolean: the string "False" must never count as true."""
    if not isinstance(value, bool):
        raise OptionError(f"{key} must be True or False; got {value!r}")
    return value


def positive_int(key: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{key} must be a positive integer; got {value!r}")
    return value


def probability(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise OptionError(f"{key} must be a number in [0, 1); got {value!r}")
    return float(value)


def bottleneck_size(hidden_size: int, reduction_rate: int) -> int:
    """Hidden / rate, at least 1 (the papers' rate 96 on 768 gives 8)."""
    return max(1, hidden_size // reduction_rate)
