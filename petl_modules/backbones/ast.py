"""Audio Spectrogram Transformer backbone: Kaldi fbank front end + `transformers.ASTModel`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import ASTModel

from .base import Backbone, ClipFrontEnd, OptionError
from .loading import load_pretrained, read_preprocessor_config

DEFAULT_AST_SOURCE = "MIT/ast-finetuned-audioset-10-10-0.4593"
# The AudioSet checkpoint's preprocessor_config.json, used when a folder has none.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


class FbankFrontEnd(ClipFrontEnd):
    """Waveform -> normalised Kaldi fbank (batch, target_length, num_mel_bins), as AST was trained.

    128 mel bins, 25 ms Hanning window, 10 ms shift, no dither, htk_compat, no energy; zero-padded or
    cropped to `target_length` frames; then (x - mean) / (2 * std). Deterministic, hence cacheable.
    """

    def __init__(
        self,
        target_length: int,
        num_mel_bins: int = 128,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        sample_rate: int = 16000,
    ) -> None:
        super().__init__()
        self.target_length = target_length
        self.num_mel_bins = num_mel_bins
        self.mean = mean
        self.std = std
        self.sample_rate = sample_rate

    def settings(self) -> dict:
        return {
            "target_length": self.target_length,
            "num_mel_bins": self.num_mel_bins,
            "mean": self.mean,
            "std": self.std,
            "sample_rate": self.sample_rate,
        }

    @torch.no_grad()
    def single(self, wav: torch.Tensor) -> torch.Tensor:
        """One waveform (samples,) -> normalised fbank (target_length, num_mel_bins)."""
        wav = F.pad(wav, (0, max(0, 400 - wav.shape[0])))  # at least one 25 ms window
        fbank = torchaudio.compliance.kaldi.fbank(
            wav[None].float(),
            htk_compat=True,
            sample_frequency=self.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.num_mel_bins,
            dither=0.0,
            frame_shift=10,
        )
        fbank = F.pad(fbank, (0, 0, 0, max(0, self.target_length - fbank.shape[0])))[: self.target_length]
        return (fbank - self.mean) / (2 * self.std)


class SpecAugment(nn.Module):
    """One frequency and one time mask per item on the normalised fbank, in training mode only.

    Masked values are 0, the corpus mean after AST's normalisation (on Whisper's log-mel, a quiet level, 10^-4
    in its log10 scale) (ESC-50 and UrbanSound8K: 24 bins, 80 frames).
    """

    def __init__(self, freq_mask: int = 24, time_mask: int = 80) -> None:
        super().__init__()
        self.freq_masking = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
        self.time_masking = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return fbank
        spectrogram = fbank.transpose(1, 2)[:, None]  # (batch, 1, mel, frames): one mask per item
        return self.time_masking(self.freq_masking(spectrogram))[:, 0].transpose(1, 2)


def adapt_position_grid(grid: torch.Tensor, new_shape: tuple[int, int]) -> torch.Tensor:
    """Carry a (1, F, T, D) positional grid over to `new_shape`, as the AST authors do.

    An axis that shrinks is cropped around its centre; an axis that grows is interpolated (bilinear).
    """
    _, f_old, t_old, _ = grid.shape
    f_new, t_new = new_shape
    if t_new < t_old:
        start = t_old // 2 - t_new // 2
        grid = grid[:, :, start : start + t_new]
    if f_new < f_old:
        start = f_old // 2 - f_new // 2
        grid = grid[:, start : start + f_new]
    if grid.shape[1:3] != (f_new, t_new):
        grid = F.interpolate(
            grid.permute(0, 3, 1, 2), size=(f_new, t_new), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
    return grid


def patch_grid_shape(config, target_length: int) -> tuple[int, int]:
    """(frequency rows, time columns) of patches for an input of `target_length` frames."""
    rows = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    columns = (target_length - config.patch_size) // config.time_stride + 1
    return rows, columns


class ASTBackbone(Backbone):
    """AST from a hub id or a local Hugging Face folder, adapted to inputs of `target_length` frames."""

    ffn_name = "mlp"
    projection_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    num_special_tokens = 2  # [CLS] and [DIST]
    sublayer_norm_names = {"attention": "layernorm_before", "ffn": "layernorm_after"}  # pre-LN: in front

    def __init__(self, source: str = DEFAULT_AST_SOURCE, target_length: int = 1024) -> None:
        super().__init__()
        self.model = load_pretrained(ASTModel, source, ("audio-spectrogram-transformer",))
        config = self.model.config
        self.hidden_size = config.hidden_size
        self.published_max_length = config.max_length  # the checkpoint's input length, before _set_target_length
        self._set_target_length(target_length)
        preprocessor = read_preprocessor_config(source)
        self.front_end = FbankFrontEnd(
            target_length,
            config.num_mel_bins,
            mean=preprocessor.get("mean", AUDIOSET_MEAN),
            std=preprocessor.get("std", AUDIOSET_STD),
            sample_rate=preprocessor.get("sampling_rate", 16000),
        )

    def _set_target_length(self, target_length: int) -> None:
        config = self.model.config
        if target_length < config.patch_size:
            raise OptionError(f"target_length must be at least the patch size {config.patch_size}; got {target_length}")
        embeddings = self.model.embeddings
        old_shape = patch_grid_shape(config, config.max_length)
        new_shape = patch_grid_shape(config, target_length)
        table = embeddings.position_embeddings.data
        tokens = self.num_special_tokens
        special, grid = table[:, :tokens], table[:, tokens:].reshape(1, *old_shape, -1)
        grid = adapt_position_grid(grid, new_shape).reshape(1, new_shape[0] * new_shape[1], -1)
        embeddings.position_embeddings = nn.Parameter(torch.cat([special, grid], dim=1).contiguous())
        config.max_length = target_length

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def padding_invariant(self) -> bool:
        return True  # each file's fbank is computed alone, padded in the fbank domain

    def input_settings(self) -> dict:
        return {"input": "fbank", **self.front_end.settings()}

    def preprocessor_config(self) -> dict:
        settings = self.front_end.settings()
        return {
            "feature_extractor_type": "ASTFeatureExtractor",
            "feature_size": 1,
            "num_mel_bins": settings["num_mel_bins"],
            "max_length": settings["target_length"],
            "mean": settings["mean"],
            "std": settings["std"],
            "sampling_rate": settings["sample_rate"],
            "do_normalize": True,
            "padding_value": 0.0,
            "return_attention_mask": False,
        }

    def adapted_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The positional grid carried over to `target_length`, when it differs from the checkpoint's."""
        if self.front_end.target_length == self.published_max_length:
            return None
        table = self.model.embeddings.position_embeddings.detach().clone()
        return {"embeddings.position_embeddings": table}, {"max_length": self.front_end.target_length}

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.model.layernorm

    @property
    def encoder(self) -> nn.Module:
        return self.model.layers

    def embed(self, inputs: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """Waveforms (batch, samples), or fbank features (batch, frames, mel) computed ahead (feature cache).

        AST pads in the fbank domain and attends to every token, as it was trained: no padding mask.
        """
        return self.model.embeddings(self.features(inputs, lengths)), None
