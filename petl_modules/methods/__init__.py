"""The tuning methods. Each is a small option object whose `apply(backbone)` injects its modules."""

from .adapter import AdaptedSublayer, Adapter
from .base import Method, PETLModule
from .blocks import BottleneckBlock, ConformerBlock
from .lora import LoRA, LoRALinear
from .moa import DenseMoA, SoftMoA
from .prompt import PrefixTuning, PromptTuning
from .selection import BitFit, FullFineTuning, LinearProbing

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (LinearProbing, FullFineTuning, Adapter, PromptTuning, PrefixTuning, LoRA, BitFit, DenseMoA, SoftMoA)
}

# The method blocks of every recipe (hparams/methods/<name>.yaml), in the papers' table order.
METHOD_FILES = (
    "linear",
    "full_ft",
    "bitfit",
    "prompt_tuning",
    "prefix_tuning",
    "lora",
    "adapter",
    "conformer_adapter",
    "dense_moa",
    "soft_moa",
)

__all__ = [
    "METHODS",
    "METHOD_FILES",
    "Adapter",
    "AdaptedSublayer",
    "BitFit",
    "BottleneckBlock",
    "ConformerBlock",
    "DenseMoA",
    "FullFineTuning",
    "LinearProbing",
    "LoRA",
    "LoRALinear",
    "Method",
    "PETLModule",
    "PrefixTuning",
    "PromptTuning",
    "SoftMoA",
]
