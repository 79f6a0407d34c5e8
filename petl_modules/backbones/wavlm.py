"""WavLM backbone: Wav2Vec2's front end and layer layout, with a gated relative position bias in every layer."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WavLMModel
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from .wav2vec2 import Wav2Vec2Backbone

DEFAULT_WAVLM_SOURCE = "microsoft/wavlm-base-plus"


class WavLMLayerInputs(NamedTuple):
    """What every WavLM layer takes besides the tokens, for one sequence length."""

    padding_mask: torch.Tensor | None  # (batch, tokens), True on real tokens: WavLM's attention takes it as is
    position_bias: torch.Tensor  # (heads, tokens, tokens): layer 0's relative attention embedding, by distance


class WavLMModuleAttention(WavLMAttention):
    """WavLM's attention computed from its projection modules, with the same values as Hugging Face's.

    Hugging Face's `WavLMAttention` hands the projections' weights to `F.multi_head_attention_forward`, so a
    method that wraps a projection (LoRA) would be ignored; this subclass (set on the checkpoint's own modules:
    same parameters, same state-dict names) calls `q_proj`, `k_proj`, `v_proj` and `out_proj`. The logits get
    the gated position bias: the bias of the query-key distance, scaled per query and head by a gate computed
    from the query token (`gru_rel_pos_linear`, `gru_rel_pos_const`), and -inf on padded keys.
    """

    def gated_position_bias(self, hidden_states: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """The bias added to the logits for the input `hidden_states` (batch, tokens, hidden): (batch, heads,
        tokens, tokens). `position_bias` is (heads, tokens, tokens) or Hugging Face's (batch * heads, ...).
        """
        batch, length, _ = hidden_states.shape
        per_head = hidden_states.view(batch, length, self.num_heads, -1).transpose(1, 2)
        projected = self.gru_rel_pos_linear(per_head).view(batch, self.num_heads, length, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(projected).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0  # (batch, heads, tokens, 1)
        return gate * position_bias.view(-1, self.num_heads, length, length)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        index: int = 0,
        **kwargs,
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        batch, length, _ = hidden_states.shape
        if position_bias is None:  # Hugging Face's encoder loop: the first layer computes it
            position_bias = self.compute_bias(length, length)
        logits_bias = self.gated_position_bias(hidden_states, position_bias)
        if attention_mask is not None:
            padded = ~attention_mask.bool()[:, None, None, :]
            logits_bias = logits_bias.masked_fill(padded, float("-inf"))

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        query, key, value = (
            heads(self.q_proj(hidden_states)),
            heads(self.k_proj(hidden_states)),
            heads(self.v_proj(hidden_states)),
        )
        dropout = self.dropout if self.training else 0.0
        logits_bias = logits_bias.to(query.dtype)  # mixed precision: the embedding's float32 bias, half queries
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=logits_bias, dropout_p=dropout)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1)), None, position_bias


class WavLMBackbone(Wav2Vec2Backbone):
    """WavLM from a hub id or a local Hugging Face folder (e.g. microsoft/wavlm-base-plus).

    Front end, padding, norms and head are Wav2Vec2's (post-LN like base-plus, or pre-LN "stable" layers
    closed by a final LayerNorm like large). What differs: each layer's attention adds a gated relative
    position bias. The bias of each query-key distance comes from layer 0's relative attention embedding;
    Hugging Face's layer 0 computes it and passes it on from layer to layer. Here `layer_attention_mask`
    computes it for the current sequence length (again when prompts change the length), outside activation
    checkpointing, and `_run_layer` hands it to each layer and to `state.position_bias` (prefix tuning adds
    it to its logits, 0 for the prefix keys). Prompts inserted in front count as positions of the sequence
    they join, as Hugging Face's layer 0 would count them. The bias depends on distances only, so padding
    changes it for no real token: a "layer"-norm CNN makes WavLM padding-invariant as it makes Wav2Vec2.
    """

    model_classes = {"wavlm": WavLMModel}
    # Hugging Face's WavLMAttention hands q/k/v/out_proj.weight to F.multi_head_attention_forward.
    peft_lora_acts = False

    def __init__(self, source: str = DEFAULT_WAVLM_SOURCE, model_type: str = "wavlm") -> None:
        super().__init__(source, model_type)
        for module in self.model.modules():
            if type(module) is WavLMAttention:
                module.__class__ = WavLMModuleAttention

    @property
    def relative_attention(self) -> WavLMModuleAttention:
        """Layer 0's attention, which holds the relative attention embedding (wherever a method wrapped it)."""
        return next(module for module in self.layers[0].modules() if isinstance(module, WavLMModuleAttention))

    def layer_dropped(self, index: int) -> bool:
        """LayerDrop as Hugging Face's WavLM encoder: never layer 0."""
        return index > 0 and super().layer_dropped(index)

    def layer_attention_mask(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> WavLMLayerInputs:
        length = tokens.shape[1]
        return WavLMLayerInputs(padding_mask, self.relative_attention.compute_bias(length, length))

    def _run_layer(
        self, layer: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, layer_mask: WavLMLayerInputs
    ) -> torch.Tensor:
        self.state.padding_mask = mask
        self.state.position_bias = layer_mask.position_bias
        hidden_states, _ = layer(tokens, attention_mask=layer_mask.padding_mask, position_bias=layer_mask.position_bias)
        return hidden_states

    def attention_logit_bias(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return attention.gated_position_bias(hidden_states, self.state.position_bias)

    def attention_result(self, output: torch.Tensor) -> tuple:
        return output, None, self.state.position_bias
