"""A frozen backbone, one tuning method and a classification head, with trainable-only state."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone
from .methods.base import Method, PETLModule, choice, flag
from .methods.lora import LoRALinear

POOLINGS = ("mean", "cls", "cls_dist")


class ClassificationHead(nn.Module):
    """Pooling over the output tokens, then one Linear (the papers' head).

    mean: over all real tokens (prompts included), the papers' choice; cls: the [CLS] token;
    cls_dist: the mean of [CLS] and [DIST] (AST's own pooler). `norm` is the final LayerNorm when
    the backbone has none of its own (post-LN Wav2Vec2).
    """

    def __init__(self, hidden_size: int, num_classes: int, pooling: str = "mean", with_norm: bool = False) -> None:
        super().__init__()
        self.pooling = choice("pooling", pooling, POOLINGS)
        self.norm = nn.LayerNorm(hidden_size) if with_norm else None
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            tokens = self.norm(tokens)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "cls_dist":
            pooled = (tokens[:, 0] + tokens[:, 1]) / 2
        elif padding_mask is None:
            pooled = tokens.mean(dim=1)
        else:
            weights = padding_mask[..., None].to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return self.linear(pooled)


class PETLModel(nn.Module):
    """Backbone + method + head, as declared in HyperPyYAML.

    Construction freezes the backbone, lets the method inject its modules and unfreeze what it trains,
    and sets the final LayerNorm trainable when `train_final_norm` (the papers' setting). During
    training the frozen backbone stays in eval mode (no dropout, no BatchNorm updates) while the
    method's modules follow `train()`; only full fine-tuning runs the backbone in training mode.
    """

    def __init__(
        self, backbone: Backbone, method: Method, num_classes: int, pooling: str = "mean", train_final_norm: bool = True
    ) -> None:
        super().__init__()
        if pooling in ("cls", "cls_dist") and backbone.num_special_tokens < (1 if pooling == "cls" else 2):
            raise ValueError(f"pooling '{pooling}' needs [CLS]/[DIST] tokens, which {type(backbone).__name__} has not")
        self.backbone = backbone
        self.method = method
        backbone.requires_grad_(False)
        method.apply(backbone)
        if backbone.final_norm is not None and flag("train_final_norm", train_final_norm):
            backbone.final_norm.requires_grad_(True)
        self.head = ClassificationHead(
            backbone.hidden_size, num_classes, pooling, with_norm=backbone.final_norm is None
        )
        if self.head.norm is not None:
            self.head.norm.requires_grad_(train_final_norm)

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Waveforms (batch, samples) at 16 kHz, SpeechBrain relative lengths -> logits (batch, classes).

        AST also takes its fbank features (batch, frames, mel), as the feature cache provides them.
        """
        tokens, mask = self.backbone(wavs, wav_lens)
        if self.backbone.final_norm is not None:
            tokens = self.backbone.final_norm(tokens)
        return self.head(tokens, mask)

    def train(self, mode: bool = True) -> PETLModel:
        super().train(mode)
        if mode and not self.method.trains_backbone:
            self.backbone.model.eval()
            for module in self.backbone.modules():
                if isinstance(module, PETLModule):
                    module.train(True)
        return self

    # --- what trains, and its state -------------------------------------------------------------

    def _method_parameter_ids(self) -> set[int]:
        return {id(p) for module in self.modules() if isinstance(module, PETLModule) for p in module.parameters()}

    def backbone_parameters(self) -> int:
        """Parameters of the pretrained model alone (injected modules excluded)."""
        injected = self._method_parameter_ids()
        return sum(p.numel() for p in self.backbone.model.parameters() if id(p) not in injected)

    def trainable_parameter_groups(self) -> dict[str, int]:
        """Trainable parameter counts: the method's (injected or unfrozen), the head's, the final norm's."""
        norm = self.backbone.final_norm if self.backbone.final_norm is not None else self.head.norm
        norm_ids = {id(p) for p in norm.parameters()} if norm is not None else set()
        head_ids = {id(p) for p in self.head.linear.parameters()}
        groups = {"method": 0, "head": 0, "final_norm": 0}
        for parameter in self.parameters():
            if parameter.requires_grad:
                group = "head" if id(parameter) in head_ids else "final_norm" if id(parameter) in norm_ids else "method"
                groups[group] += parameter.numel()
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors plus the buffers of injected modules (BatchNorm statistics), nothing else."""
        state = {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}
        for module_name, module in self.named_modules():
            if isinstance(module, PETLModule):
                for name, buffer in module.named_buffers(prefix=module_name):
                    state[name] = buffer.detach().clone()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `trainable_state_dict` into a model built with the same method and options."""
        expected = self.trainable_state_dict().keys()
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"trainable state does not match this model: {len(missing)} missing "
                f"(first: {missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]}); "
                "was it saved with another method or options?"
            )
        self.load_state_dict(state, strict=False)

    def lora_layers(self) -> list[LoRALinear]:
        return [module for module in self.modules() if isinstance(module, LoRALinear)]

    def merge_lora(self) -> None:
        """Fold every LoRA update into its frozen weight: inference at the backbone's own cost."""
        for layer in self.lora_layers():
            layer.merge()

    def unmerge_lora(self) -> None:
        for layer in self.lora_layers():
            layer.unmerge()
