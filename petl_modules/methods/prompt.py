"""Prompt tuning (shallow / deep, Jia et al. 2022) and prefix tuning (Li & Liang, 2021)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, ForwardState
from .base import Method, PETLModule, flag, positive_int, probability


class PromptTokens(PETLModule):
    """Learned tokens inserted at position `insert_at` before the first layer, in place of the `replace`
    tokens there (AST: after [CLS], replacing [DIST], as the reference does).

    Shallow: one set of prompts enters once and flows through the layers. Deep: every layer gets its
    own prompts, which replace the previous layer's prompt outputs. Prompts carry no positional
    embedding and are never padding.
    """

    def __init__(
        self,
        num_layers: int,
        prompt_len: int,
        hidden_size: int,
        deep: bool,
        dropout: float,
        insert_at: int,
        replace: int = 0,
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_layers if deep else 1, prompt_len, hidden_size) * 0.02)
        self.deep = deep
        self.dropout = nn.Dropout(dropout)
        self.insert_at = insert_at
        self.replace = replace

    def forward(self, layer_index: int, tokens: torch.Tensor, mask: torch.Tensor | None):
        if layer_index > 0 and not self.deep:
            return tokens, mask
        batch, length = tokens.shape[0], self.prompts.shape[1]
        prompts = self.dropout(self.prompts[layer_index]).expand(batch, -1, -1).to(tokens.dtype)
        start = self.insert_at
        rest = tokens[:, start + self.replace :] if layer_index == 0 else tokens[:, start + length :]
        tokens = torch.cat([tokens[:, :start], prompts, rest], dim=1)
        if mask is not None and layer_index == 0:
            real = torch.ones(batch, length, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([mask[:, :start], real, mask[:, start + self.replace :]], dim=1)
        return tokens, mask


class PromptTuning(Method):
    """Shallow (`deep: False`) or deep prompt tuning with `prompt_len` prompts (papers: 25).

    The prompts follow [CLS] and replace the other special tokens (AST's [DIST]), as the reference does:
    AST's first layer sees [CLS], prompts, patches. `keep_dist_token` inserts them after [DIST] instead.
    """

    name = "prompt_tuning"

    def __init__(
        self, prompt_len: int = 25, deep: bool = False, dropout: float = 0.0, keep_dist_token: bool = False
    ) -> None:
        self.prompt_len = positive_int("prompt_len", prompt_len)
        self.deep = flag("deep", deep)
        self.dropout = probability("dropout", dropout)
        self.keep_dist_token = flag("keep_dist_token", keep_dist_token)

    def apply(self, backbone: Backbone) -> None:
        special = backbone.num_special_tokens
        insert_at = special if self.keep_dist_token else min(special, 1)
        backbone.special_tokens_removed = special - insert_at
        backbone.token_hooks.append(
            PromptTokens(
                len(backbone.layers),
                self.prompt_len,
                backbone.hidden_size,
                self.deep,
                self.dropout,
                insert_at,
                replace=special - insert_at,
            )
        )


class PrefixKeysValues(PETLModule):
    """`prefix_len` learned key and value vectors for one attention layer."""

    def __init__(self, prefix_len: int, hidden_size: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(prefix_len, hidden_size) * 0.02)
        self.values = nn.Parameter(torch.randn(prefix_len, hidden_size) * 0.02)


class PrefixAttention(nn.Module):
    """The frozen attention's projections, with learned keys and values prepended to its own.

    Padding comes from the backbone's `ForwardState` (prefixes are never padding), not from the mask the
    Hugging Face layer passes, whose format depends on the attention implementation. The logits of the
    layer's own keys get what the frozen attention adds to them (`Backbone.attention_logit_bias`: WavLM's
    gated relative position bias); the prefix keys have no position and get none. The result takes the
    form the layer expects (`Backbone.attention_result`).
    """

    def __init__(
        self,
        attention: nn.Module,
        projection_names: dict[str, str],
        num_heads: int,
        prefix: PrefixKeysValues,
        state: ForwardState,
        logit_bias: Callable[[nn.Module, torch.Tensor], torch.Tensor | None],
        result: Callable[[torch.Tensor], tuple],
    ) -> None:
        super().__init__()
        self.attention = attention
        self.projection_names = projection_names
        self.num_heads = num_heads
        self.prefix = prefix
        self.state = state
        self.logit_bias = logit_bias
        self.result = result

    def _project(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.attention, self.projection_names[which])(x)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        batch, length, _ = hidden_states.shape
        prefix_len = self.prefix.keys.shape[0]
        query = self._heads(self._project("q", hidden_states))
        keys = torch.cat([self.prefix.keys.expand(batch, -1, -1), self._project("k", hidden_states)], dim=1)
        values = torch.cat([self.prefix.values.expand(batch, -1, -1), self._project("v", hidden_states)], dim=1)
        mask = self.state.padding_mask
        if mask is not None:
            mask = F.pad(mask, (prefix_len, 0), value=True)[:, None, None, :]
        bias = self.logit_bias(self.attention, hidden_states)
        if bias is not None:  # (batch, heads, length, length): none on the prefix keys, -inf on padded keys
            bias = F.pad(bias, (prefix_len, 0)).to(query.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        attended = F.scaled_dot_product_attention(query, self._heads(keys), self._heads(values), attn_mask=mask)
        output = self._project("o", attended.transpose(1, 2).reshape(batch, length, -1))
        return self.result(output)


class PrefixTuning(Method):
    """Prefix tuning: `prefix_len` key and `prefix_len` value vectors per layer (papers: 12 + 12)."""

    name = "prefix_tuning"

    def __init__(self, prefix_len: int = 12) -> None:
        self.prefix_len = positive_int("prefix_len", prefix_len)

    def apply(self, backbone: Backbone) -> None:
        for layer in backbone.layers:
            attention = getattr(layer, backbone.attention_name)
            prefix = PrefixKeysValues(self.prefix_len, backbone.hidden_size)
            setattr(
                layer,
                backbone.attention_name,
                PrefixAttention(
                    attention,
                    backbone.projection_names,
                    backbone.num_heads,
                    prefix,
                    backbone.state,
                    backbone.attention_logit_bias,
                    backbone.attention_result,
                ),
            )
