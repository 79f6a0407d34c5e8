"""Whisper's encoder (its decoder stays behind) on Whisper's log-mel front end.

Whisper was trained on 30 s windows: every input is padded to 3000 frames (1500 tokens), so a 1 s keyword
pays for 30 s of attention. `whisper_window` chooses:

- `clip` (the default): the recipe's `target_length` frames (the dataset's clip length: ESC-50 500, GSC 100),
  with the positional table cut to its first `target_length / 2` rows, as audio-tagging work on Whisper does;
- `30s`: the 30 s window Whisper was trained on, exactly Hugging Face's `WhisperEncoder` forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer

from .base import Backbone, ClipFrontEnd, OptionError
from .loading import BackboneLoadError, _local_config, load_pretrained, read_preprocessor_config

DEFAULT_WHISPER_SOURCE = "openai/whisper-base"
WINDOWS = ("clip", "30s")
# config.json `architectures` of a folder holding the encoder alone (what `export --merge` writes).
ENCODER_ONLY = ["WhisperEncoder"]


class WhisperLogMel(ClipFrontEnd):
    """Waveform -> Whisper's log-mel features (target_length, mel), by the checkpoint's own feature extractor.

    Hugging Face's `WhisperFeatureExtractor` with the checkpoint's `preprocessor_config.json` (25 ms Hann
    window, 10 ms hop, log10 mel energies clamped to 8 below the clip's maximum, then (x + 4) / 4) on the
    waveform zero-padded or cut to `target_length` hops. Deterministic, hence cacheable.
    """

    def __init__(self, preprocessor: dict, target_length: int) -> None:
        super().__init__()
        self.extractor = WhisperFeatureExtractor(**preprocessor)
        self.target_length = target_length
        self.num_mel_bins = self.extractor.feature_size
        self.sample_rate = self.extractor.sampling_rate

    def settings(self) -> dict:
        extractor = self.extractor
        return {
            "front_end": "whisper_log_mel",
            "target_length": self.target_length,
            "num_mel_bins": self.num_mel_bins,
            "sample_rate": self.sample_rate,
            "n_fft": extractor.n_fft,
            "hop_length": extractor.hop_length,
        }

    @torch.no_grad()
    def single(self, wav: torch.Tensor) -> torch.Tensor:
        samples = self.target_length * self.extractor.hop_length
        features = self.extractor(
            wav.detach().float().cpu().numpy(),
            sampling_rate=self.sample_rate,
            padding="max_length",
            max_length=samples,
            truncation=True,
            return_tensors="pt",
        ).input_features[0]
        return features.transpose(0, 1).to(wav.device)

    def preprocessor_config(self) -> dict:
        """The extractor's settings with the window it runs on (chunk_length in seconds)."""
        config = self.extractor.to_dict()
        samples = self.target_length * self.extractor.hop_length
        chunk = samples / self.sample_rate
        config.update(
            chunk_length=int(chunk) if chunk.is_integer() else chunk,
            n_samples=samples,
            nb_max_frames=self.target_length,
        )
        return config


class WhisperFeedForward(nn.Module):
    """The feed-forward block of a Whisper encoder layer (fc1, activation, fc2) as one callable sub-layer.

    Hugging Face computes it inline in the layer's forward; methods need a module to wrap. The view holds no
    tensors: fc1 and fc2 stay the layer's own, so the state-dict names stay Hugging Face's.
    """

    def __init__(self, layer: WhisperEncoderLayer) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the layer owns fc1 and fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        hidden_states = layer.activation_fn(layer.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=layer.activation_dropout, training=layer.training)
        return layer.fc2(hidden_states)


class WhisperSublayersEncoderLayer(WhisperEncoderLayer):
    """Hugging Face's pre-LN Whisper encoder layer, computing the same, with its FFN called as `self.ffn`.

    Each sub-layer reads its LayerNorm's output and enters the residual stream once.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask)
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        residual = hidden_states
        hidden_states = self.ffn(self.final_layer_norm(hidden_states))
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if hidden_states.dtype == torch.float16:
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


def load_whisper_encoder(source: str) -> tuple[WhisperEncoder, type, str | None]:
    """The encoder of a Whisper checkpoint (hub id or folder), or of a folder holding the encoder alone; with
    the class that loads the checkpoint and the attribute of that class's model that is the encoder.
    """
    config = _local_config(source)
    if config is not None and config.get("architectures") == ENCODER_ONLY:
        return load_pretrained(WhisperEncoder, source, ("whisper",)), WhisperEncoder, None
    return load_pretrained(WhisperModel, source, ("whisper",)).encoder, WhisperModel, "encoder"


class WhisperBackbone(Backbone):
    """The Whisper encoder from a hub id or a local Hugging Face folder (e.g. openai/whisper-base).

    Pre-LN layers closed by a final LayerNorm, like AST; two GELU convolutions (the second with stride 2)
    turn log-mel frames into tokens, one per 20 ms, plus a fixed sinusoidal positional table. No token is
    padding: each file's features are computed alone and padded in the feature domain, as Whisper was
    trained, so the backbone is padding-invariant and every token is attended to.
    """

    attention_name = "self_attn"
    ffn_name = "ffn"
    projection_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    sublayer_norm_names = {"attention": "self_attn_layer_norm", "ffn": "final_layer_norm"}  # pre-LN: in front

    def __init__(self, source: str = DEFAULT_WHISPER_SOURCE, target_length: int = 3000, window: str = "clip") -> None:
        super().__init__()
        if window not in WINDOWS:
            raise OptionError(f"whisper_window must be one of {', '.join(WINDOWS)}; got {window!r}")
        self.model, self._checkpoint_class, self.checkpoint_attribute = load_whisper_encoder(source)
        config = self.model.config
        self.hidden_size = config.d_model
        self.window = window
        self.published_positions = config.max_source_positions
        full = 2 * config.max_source_positions
        frames = full if window == "30s" else target_length
        if window == "clip" and not (isinstance(frames, int) and 2 <= frames <= full and frames % 2 == 0):
            raise OptionError(
                f"target_length must be an even number of frames from 2 to {full} (the checkpoint's window) for "
                f"whisper_window: clip; got {target_length!r}"
            )
        self._cut_positions(frames // 2)
        preprocessor = read_preprocessor_config(source) or {"feature_size": config.num_mel_bins}
        preprocessor = {key: value for key, value in preprocessor.items() if key != "feature_extractor_type"}
        if preprocessor.get("feature_size", config.num_mel_bins) != config.num_mel_bins:
            raise BackboneLoadError(
                f"backbone_source '{source}': preprocessor_config.json has {preprocessor['feature_size']} mel bins, "
                f"the model {config.num_mel_bins}"
            )
        self.front_end = WhisperLogMel(preprocessor, frames)
        for layer in self.layers:
            layer.__class__ = WhisperSublayersEncoderLayer
            layer.ffn = WhisperFeedForward(layer)

    def _cut_positions(self, tokens: int) -> None:
        """Keep the first `tokens` rows of the positional table (the window's tokens)."""
        table = self.model.embed_positions
        if tokens != table.num_embeddings:
            cut = nn.Embedding(tokens, self.hidden_size)
            cut.weight = nn.Parameter(table.weight.data[:tokens].clone(), requires_grad=False)
            self.model.embed_positions = cut
            self.model.config.max_source_positions = tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def checkpoint_class(self) -> str:
        return self._checkpoint_class.__name__

    @property
    def padding_invariant(self) -> bool:
        return True  # each file's features are computed alone, padded in the feature domain

    def input_settings(self) -> dict:
        return {"input": "log_mel", "whisper_window": self.window, **self.front_end.settings()}

    def preprocessor_config(self) -> dict:
        return self.front_end.preprocessor_config()

    def adapted_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The positional table cut to the clip's tokens, when it is shorter than the checkpoint's."""
        tokens = self.model.embed_positions.num_embeddings
        if tokens == self.published_positions:
            return None
        return {"embed_positions.weight": self.model.embed_positions.weight.detach().clone()}, {
            "max_source_positions": tokens
        }

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.model.layer_norm

    @property
    def encoder(self) -> nn.Module:
        return self.model

    def always_frozen(self) -> list[nn.Parameter]:
        return [self.model.embed_positions.weight]  # sinusoidal, never trained in Whisper

    def layer_dropped(self, index: int) -> bool:
        layerdrop = self.model.layerdrop
        return self.model.training and layerdrop > 0 and bool(torch.rand(()) < layerdrop)

    def embed(self, inputs: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """Waveforms (batch, samples), or log-mel features (batch, frames, mel) computed ahead (feature cache)."""
        encoder = self.model
        features = self.features(inputs, lengths).transpose(1, 2)
        tokens = F.gelu(encoder.conv2(F.gelu(encoder.conv1(features)))).transpose(1, 2)
        tokens = tokens + encoder.embed_positions.weight
        return F.dropout(tokens, p=encoder.dropout, training=encoder.training), None
