"""What every backbone offers the tuning methods: its layers, their sub-layers, and a forward loop we own.

Owning the loop over the encoder layers (instead of calling the Hugging Face model's forward) is what lets
prompt tuning insert tokens with a matching padding mask, and keeps training-only behaviour of the frozen
model (LayerDrop, SpecAugment-style masking) out of PETL runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ForwardState:
    """Per-forward facts shared with injected modules that need them (not a module: no parameters).

    `padding_mask` is (batch, tokens), True on real tokens, or None when no token is padding.
    """

    padding_mask: torch.Tensor | None = None


class Backbone(nn.Module):
    """A pretrained transformer encoder with the hooks the tuning methods use.

    Subclasses set `model` (the Hugging Face model), `hidden_size`, the attribute names of the
    sub-layers, and implement `embed` (input -> tokens before the first layer).
    """

    model: nn.Module
    hidden_size: int
    attention_name = "attention"
    ffn_name: str
    projection_names: dict[str, str]  # "q", "k", "v", "o" -> attribute name inside the attention module
    num_special_tokens = 0  # tokens in front of the sequence that prompts are inserted after

    def __init__(self) -> None:
        super().__init__()
        self.state = ForwardState()
        # Callables (layer_index, tokens, mask) -> (tokens, mask) run before each layer: prompt tuning.
        self.token_hooks = nn.ModuleList()

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def final_norm(self) -> nn.LayerNorm | None:
        """The LayerNorm that closes the encoder, or None when the architecture has none (post-LN)."""
        return None

    @property
    def encoder(self) -> nn.Module:
        """The transformer part whose Linear and LayerNorm biases BitFit trains."""
        raise NotImplementedError

    def always_frozen(self) -> list[nn.Parameter]:
        """Tensors that stay frozen in every method (the Wav2Vec2 CNN feature encoder)."""
        return []

    def embed(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveforms (batch, samples) -> tokens (batch, tokens, hidden) and their padding mask."""
        raise NotImplementedError

    def layer_attention_mask(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask in the form the Hugging Face layers expect."""
        return None

    def forward(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveforms -> last-layer tokens (before the final norm) and their padding mask."""
        tokens, mask = self.embed(wavs, wav_lens)
        layer_mask = self.layer_attention_mask(tokens, mask)
        for index, layer in enumerate(self.layers):
            for hook in self.token_hooks:
                new_tokens, new_mask = hook(index, tokens, mask)
                if new_tokens.shape[1] != tokens.shape[1]:
                    layer_mask = self.layer_attention_mask(new_tokens, new_mask)
                tokens, mask = new_tokens, new_mask
            self.state.padding_mask = mask
            tokens = layer(tokens, attention_mask=layer_mask)
        return tokens, mask


def relative_to_mask(wav_lens: torch.Tensor | None, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """SpeechBrain relative lengths (0..1] -> boolean mask (batch, length), True on real samples."""
    if wav_lens is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    absolute = torch.round(wav_lens.to(device) * length).long().clamp(1, length)
    return torch.arange(length, device=device)[None, :] < absolute[:, None]
