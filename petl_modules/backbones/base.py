"""What every backbone offers the tuning methods: its layers, their sub-layers, and a forward loop we own.

Owning the loop over the encoder layers (instead of calling the Hugging Face model's forward) is what lets
prompt tuning insert tokens with a matching padding mask, and keeps training-only behaviour of the frozen
model (LayerDrop, SpecAugment-style masking) out of PETL runs. With `activation_checkpointing`, each
layer's activations are recomputed in the backward pass instead of kept (long inputs: less memory, more time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_bidirectional_mask


class OptionError(ValueError):
    """An option of a backbone, a method or the model is out of its range; the message names it and what it takes."""


@dataclass
class ForwardState:
    """Per-forward facts shared with injected modules that need them (not a module: no parameters).

    `padding_mask` is (batch, tokens), True on real tokens, or None when no token is padding.
    `position_bias` is what a layer passes on to the next besides the tokens (WavLM's relative position bias,
    (heads, tokens, tokens)), None where the architecture passes nothing. `_run_layer` sets them from its
    arguments before each layer (so a recomputed layer reads its own again); `reset` clears them at the start
    of each forward, so that no value of an earlier forward is ever read.
    `task_rows` (task name -> the batch rows of that task) is set around a forward by the multi-task
    classifier (`petl_modules.multitask`) for its routed modules, and None otherwise; `reset` leaves it.
    """

    padding_mask: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    task_rows: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self.padding_mask = None
        self.position_bias = None


class Backbone(nn.Module):
    """A pretrained transformer encoder with the hooks the tuning methods use, and what callers need to know.

    Subclasses set `model` (the Hugging Face model), `hidden_size`, the attribute names of the sub-layers, and
    implement `embed` (input -> tokens before the first layer). What callers outside `backbones/` need is said
    here, so that none of them asks which backbone it has:

    - `front_end`: the deterministic module that turns waveforms into the features `embed` takes (AST's fbank),
      or None when the encoder reads waveforms. A front end has `single(wav)`, `settings()` (what its features
      depend on: the key of a feature cache), `sample_rate`, and `forward(wavs, wav_lens)`. SpecAugment and
      the feature cache apply only where there is one.
    - `sample_rate`: what the input waveforms must be.
    - `padding_invariant`: whether a file's output is the same alone and in a zero-padded batch.
    - `input_settings()`: the input contract an export records; `preprocessor_config()`: the Hugging Face
      `preprocessor_config.json` of the backbone as it runs; `adapted_checkpoint()`: tensors and config values
      the backbone changed in its checkpoint (AST's positional grid), which an export in the checkpoint's own
      format must carry.
    - `checkpoint_class`, `checkpoint_attribute`: the Hugging Face class that loads the checkpoint and the
      attribute of its model that `model` is (Whisper: `WhisperModel`, `encoder`), None when `model` is the
      loaded model itself: how an export in PEFT's format says to build its base.
    - `num_special_tokens`: [CLS]-like tokens in front of the sequence.
    - `peft_lora_acts`: whether PEFT's LoRA on the Hugging Face model's attention projections changes what
      that model computes (False where its attention reads the projections' weights instead of calling them,
      as WavLM's does): an export in PEFT's format needs it.
    """

    model: nn.Module
    hidden_size: int
    attention_name = "attention"
    ffn_name: str
    projection_names: dict[str, str]  # "q", "k", "v", "o" -> attribute name inside the attention module
    num_special_tokens = 0  # tokens in front of the sequence that prompts are inserted after
    peft_lora_acts = True
    checkpoint_attribute: str | None = None
    # The LayerNorm of each sub-layer ("attention", "ffn") in a layer: the one in front of it (pre-LN) or the
    # one closing its residual block (post-LN). Adapters and MoA train these where the reference does.
    sublayer_norm_names: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.front_end: nn.Module | None = None  # set by a backbone with a front end (an instance attribute:
        # a class attribute would hide the submodule nn.Module registers)
        self.state = ForwardState()
        # Callables (layer_index, tokens, mask) -> (tokens, mask) run before each layer: prompt tuning.
        self.token_hooks = nn.ModuleList()
        # Special tokens a method removed (prompt tuning replaces AST's [DIST]): the output keeps the rest.
        self.special_tokens_removed = 0
        # Recompute each encoder layer in the backward pass (training with gradients only): same outputs and
        # gradients, activation memory of one layer instead of all. Set by build_backbone.
        self.activation_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def checkpoint_class(self) -> str:
        return type(self.model).__name__

    @property
    def sample_rate(self) -> int:
        return self.front_end.sample_rate if self.front_end is not None else 16000

    @property
    def padding_invariant(self) -> bool:
        raise NotImplementedError

    def features(self, inputs: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """What `embed` reads: the front end's features of waveforms (batch, samples), or `inputs` themselves
        when they are features computed ahead (batch, frames, bins: the feature cache) or there is no front
        end.
        """
        if self.front_end is None or inputs.dim() == 3:
            return inputs
        return self.front_end(inputs, lengths)

    def input_settings(self) -> dict:
        """What the input must be, as an export records it."""
        raise NotImplementedError

    def preprocessor_config(self) -> dict:
        """The `preprocessor_config.json` of this backbone as it runs (Hugging Face's feature extractor)."""
        raise NotImplementedError

    def adapted_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Tensors of `model` (by state-dict name) and config values this backbone changed in its checkpoint,
        None when it runs the checkpoint as published.
        """
        return None

    @property
    def num_output_special_tokens(self) -> int:
        """[CLS]-like tokens in front of the output sequence (what `cls` / `cls_dist` pooling reads)."""
        return self.num_special_tokens - self.special_tokens_removed

    def sublayer_norm(self, layer: nn.Module, sublayer: str) -> nn.LayerNorm:
        """The LayerNorm that belongs to `sublayer` ("attention" or "ffn") of `layer`."""
        return getattr(layer, self.sublayer_norm_names[sublayer])

    def layer_dropped(self, index: int) -> bool:
        """LayerDrop: whether layer `index` is skipped this time (only a backbone in training mode may say yes)."""
        return False

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

    def layer_attention_mask(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None):
        """What every layer takes besides the tokens, for the current sequence length: the mask in the form the
        Hugging Face layers expect (None when no token is padding), or what the backbone's `_run_layer` unpacks
        (WavLM: with its relative position bias). Computed before the first layer and again whenever a token
        hook changes the tokens' length or mask, outside activation checkpointing (a recomputed layer gets the
        same object).
        """
        if padding_mask is None:
            return None
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=tokens, attention_mask=padding_mask)

    def attention_logit_bias(self, attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """What the frozen `attention` module adds to its attention logits besides the padding mask, for its
        input `hidden_states`: (batch, heads, queries, keys), or None (AST, Wav2Vec2). A module that computes
        a layer's attention from the projections itself (prefix tuning) adds it to the same logits.
        """
        return None

    def attention_result(self, output: torch.Tensor) -> tuple:
        """What a layer takes back from its attention module, given the attention's output (batch, tokens,
        hidden): Hugging Face's (output, attention weights) here, with None for the weights.
        """
        return output, None

    def forward(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveforms -> last-layer tokens (before the final norm) and their padding mask."""
        self.state.reset()
        tokens, mask = self.embed(wavs, wav_lens)
        layer_mask = self.layer_attention_mask(tokens, mask)
        for index, layer in enumerate(self.layers):
            for hook in self.token_hooks:
                new_tokens, new_mask = hook(index, tokens, mask)
                if new_tokens.shape[1] != tokens.shape[1] or new_mask is not mask:
                    layer_mask = self.layer_attention_mask(new_tokens, new_mask)
                tokens, mask = new_tokens, new_mask
            if self.layer_dropped(index):
                continue
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # The padding mask is set inside the recomputed function: injected modules read it again there.
                tokens = checkpoint(self._run_layer, layer, tokens, mask, layer_mask, use_reentrant=False)
            else:
                tokens = self._run_layer(layer, tokens, mask, layer_mask)
        return tokens, mask

    def _run_layer(self, layer: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, layer_mask) -> torch.Tensor:
        """One layer on `tokens`, after setting the `state` its injected modules read.

        `layer_mask` is what `layer_attention_mask` gave for this length.
        """
        self.state.padding_mask = mask
        return layer(tokens, attention_mask=layer_mask)


class ClipFrontEnd(nn.Module):
    """A deterministic front end that turns each waveform alone into features of a fixed size (frames, bins).

    Subclasses set `target_length` (frames), `num_mel_bins`, `sample_rate` and implement `single` and
    `settings`. Features are computed file by file, so a file's features are the same alone and in a
    zero-padded batch, and a feature cache can store them.
    """

    target_length: int
    num_mel_bins: int
    sample_rate: int

    def settings(self) -> dict:
        """Everything the features depend on (the key of a feature cache)."""
        raise NotImplementedError

    def single(self, wav: torch.Tensor) -> torch.Tensor:
        """One waveform (samples,) -> features (target_length, num_mel_bins)."""
        raise NotImplementedError

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Waveforms (batch, samples), each used up to its relative length -> (batch, frames, bins)."""
        lengths = (
            [wavs.shape[1]] * len(wavs) if wav_lens is None else (wav_lens * wavs.shape[1]).round().long().tolist()
        )
        return torch.stack([self.single(wav[:length]) for wav, length in zip(wavs, lengths)])


def relative_to_mask(wav_lens: torch.Tensor | None, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """SpeechBrain relative lengths (0..1] -> boolean mask (batch, length), True on real samples."""
    if wav_lens is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    absolute = torch.round(wav_lens.to(device) * length).long().clamp(1, length)
    return torch.arange(length, device=device)[None, :] < absolute[:, None]
