"""A frozen backbone, one tuning method and a classification head, with trainable-only state."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone, OptionError
from .methods.base import Method, PETLModule, choice, flag
from .methods.lora import LoRALinear

POOLINGS = ("mean", "cls", "cls_dist")


class ClassificationHead(nn.Module):
    """Pooling over the output tokens, then one Linear (the papers' head).

    mean: over all real tokens (prompts included), the papers' choice; cls: the [CLS] token;
    cls_dist: the mean of [CLS] and [DIST] (AST's own pooler). `with_norm` adds a LayerNorm in front
    (off by default: the reference's Wav2Vec2 head is the Linear alone on the mean-pooled last layer).
    """

    def __init__(self, hidden_size: int, num_classes: int, pooling: str = "mean", with_norm: bool = False) -> None:
        super().__init__()
        self.pooling = choice("pooling", pooling, POOLINGS)
        self.norm = nn.LayerNorm(hidden_size) if with_norm else None
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            tokens = self.norm(tokens)
        return self.linear(self.pool(tokens, padding_mask))

    def pool(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, hidden), by `pooling` over the real tokens."""
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "cls_dist":
            return (tokens[:, 0] + tokens[:, 1]) / 2
        if padding_mask is None:
            return tokens.mean(dim=1)
        weights = padding_mask[..., None].to(tokens.dtype)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


class PETLModel(nn.Module):
    """Backbone + method + head, as declared in HyperPyYAML.

    Construction freezes the backbone, lets the method inject its modules and unfreeze what it trains,
    sets the final LayerNorm trainable when `train_final_norm` (the papers' setting on AST; the method
    says which of its tensors: BitFit the bias only), and the LayerNorms of the sub-layers the method
    adapts when `train_sublayer_norms` (the reference's setting on AST).
    `head_norm` adds a LayerNorm to the head, trained likewise (for post-LN backbones, which have no
    final norm; the reference has none). During training the frozen backbone stays in eval mode (no
    dropout, no BatchNorm updates) while the method's modules follow `train()`; only full fine-tuning
    runs the backbone in training mode. The arguments' defaults are the reference's AST ones; the YAML
    model block (`hparams/model.yaml`) picks the reference's defaults for each backbone.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: Method,
        num_classes: int,
        pooling: str = "mean",
        train_final_norm: bool = True,
        head_norm: bool = False,
        train_sublayer_norms: bool = True,
    ) -> None:
        super().__init__()
        flag("train_final_norm", train_final_norm)
        flag("train_sublayer_norms", train_sublayer_norms)
        self.backbone = backbone
        self.method = method
        backbone.requires_grad_(False)
        method.apply(backbone)
        for norm in method.sublayer_norms(backbone) if train_sublayer_norms else []:
            norm.requires_grad_(True)
        needed = {"cls": 1, "cls_dist": 2}.get(pooling, 0)
        if backbone.num_output_special_tokens < needed:
            reason = "has not" if backbone.num_special_tokens < needed else f"loses to {method.name} (keep_dist_token)"
            kind = type(backbone).__name__
            raise OptionError(f"pooling '{pooling}' needs [CLS]/[DIST] tokens, which {kind} {reason}")
        self.head = ClassificationHead(
            backbone.hidden_size, num_classes, pooling, with_norm=flag("head_norm", head_norm)
        )
        for norm in (backbone.final_norm, self.head.norm):
            if norm is not None and train_final_norm:
                for parameter in method.final_norm_parameters(norm):
                    parameter.requires_grad_(True)

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
        """Trainable parameter counts: the method's (injected or unfrozen), the head's, the final norm's
        (and the head's norm) and the sub-layer norms' that train beside the method's modules.
        """
        owners = {id(p): "head" for p in self.head.linear.parameters()}
        for norm in (self.backbone.final_norm, self.head.norm):
            owners.update({id(p): "final_norm" for p in norm.parameters()} if norm is not None else {})
        for norm in self.method.sublayer_norms(self.backbone):
            owners.update({id(p): "sublayer_norm" for p in norm.parameters()})
        groups = {"method": 0, "head": 0, "final_norm": 0, "sublayer_norm": 0}
        for parameter in self.parameters():
            if parameter.requires_grad:
                groups[owners.get(id(parameter), "method")] += parameter.numel()
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
