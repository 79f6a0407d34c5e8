"""Wav2Vec 2.0 and the encoders with its layer layout (HuBERT, Data2Vec-audio) on raw 16 kHz waveforms."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Data2VecAudioModel, HubertModel, Wav2Vec2Model

from .base import Backbone, relative_to_mask
from .loading import load_pretrained, read_preprocessor_config

DEFAULT_WAV2VEC2_SOURCE = "facebook/wav2vec2-base-960h"
# `backbone` names of the Wav2Vec2 family -> the Hugging Face model (its config's model_type is what a checkpoint
# must declare: "data2vec-audio" for data2vec).
MODEL_CLASSES = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "data2vec": Data2VecAudioModel}


class Wav2Vec2Backbone(Backbone):
    """Wav2Vec2, HuBERT or Data2Vec-audio from a hub id or a local Hugging Face folder.

    The three share the CNN feature encoder, the feature projection, the convolutional positional embedding
    in front of the layers and the layers themselves (post-LN, or pre-LN "stable" ones closed by a final
    LayerNorm); Data2Vec-audio's positional embedding is a stack of convolutions instead of one.

    Padding is handled exactly: padded samples are zeroed, the frame mask follows the CNN's output
    lengths, attention never looks at padded frames, and the head pools real frames only. (Base
    checkpoints normalise the first CNN layer over the whole padded input, as they were trained;
    "layer"-norm checkpoints such as the large ones are fully padding-invariant.)

    In training mode (full fine-tuning only: PETL methods keep the backbone in eval mode) the checkpoint's
    own regularisers act as in the reference's `model.train()`: time masking of the projected features
    (`mask_time_prob`, the learned mask embedding) and LayerDrop (`layerdrop`), besides dropout.
    """

    ffn_name = "feed_forward"
    projection_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    # Pre-LN ("stable") layers: the norm in front of each sub-layer; post-LN: the norm closing its residual block.
    sublayer_norm_names = {"attention": "layer_norm", "ffn": "final_layer_norm"}
    model_classes = MODEL_CLASSES

    def __init__(self, source: str = DEFAULT_WAV2VEC2_SOURCE, model_type: str = "wav2vec2") -> None:
        super().__init__()
        if model_type not in self.model_classes:
            raise ValueError(f"model_type must be one of {', '.join(self.model_classes)}; got '{model_type}'")
        model_class = self.model_classes[model_type]
        self.model = load_pretrained(model_class, source, (model_class.config_class.model_type,))
        self.hidden_size = self.model.config.hidden_size
        self.normalize_waveform = read_preprocessor_config(source).get("do_normalize", True)
        self.stable_layer_norm = getattr(self.model.config, "do_stable_layer_norm", False)  # Data2Vec: post-LN only

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def padding_invariant(self) -> bool:
        """Only "layer"-norm CNNs with one positional convolution.

        The base checkpoints' group norm spans the whole padded input; Data2Vec-audio's stacked positional
        convolutions (as Hugging Face runs them) turn the zeroed padded frames into non-zero ones that the
        next convolution carries into the last real frames.
        """
        config = self.model.config
        return config.model_type != "data2vec-audio" and getattr(config, "feat_extract_norm", None) == "layer"

    def input_settings(self) -> dict:
        return {"input": "waveform", "sample_rate": self.sample_rate, "normalize_waveform": self.normalize_waveform}

    def preprocessor_config(self) -> dict:
        return {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "do_normalize": self.normalize_waveform,
            "sampling_rate": self.sample_rate,
        }

    @property
    def final_norm(self) -> nn.LayerNorm | None:
        # Pre-LN ("stable") encoders close with a LayerNorm; post-LN ones apply it before the layers.
        return self.model.encoder.layer_norm if self.stable_layer_norm else None

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def always_frozen(self) -> list[nn.Parameter]:
        # The CNN feature encoder, and the mask embedding of pre-training's SpecAugment, which we never apply.
        frozen = list(self.model.feature_extractor.parameters())
        if getattr(self.model, "masked_spec_embed", None) is not None:
            frozen.append(self.model.masked_spec_embed)
        return frozen

    def embed(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        sample_mask = relative_to_mask(wav_lens, wavs.shape[1], wavs.shape[0], wavs.device)
        wavs = wavs * sample_mask
        if self.normalize_waveform:
            count = sample_mask.sum(1, keepdim=True)
            mean = wavs.sum(1, keepdim=True) / count
            var = ((wavs - mean) ** 2 * sample_mask).sum(1, keepdim=True) / count
            wavs = (wavs - mean) / torch.sqrt(var + 1e-7) * sample_mask
        features = self.model.feature_extractor(wavs).transpose(1, 2)
        frame_mask = None
        if wav_lens is not None and not bool(sample_mask.all()):
            frame_mask = self.model._get_feature_vector_attention_mask(features.shape[1], sample_mask.long())
        projected = self.model.feature_projection(features)
        tokens = projected[0] if isinstance(projected, tuple) else projected
        if frame_mask is not None:
            tokens = tokens * frame_mask[..., None]
        if self.model.training:  # the checkpoint's time masking (SpecAugment), on real frames only
            tokens = self.model._mask_hidden_states(
                tokens.clone(), attention_mask=None if frame_mask is None else frame_mask.long()
            )
        encoder = self.model.encoder
        tokens = tokens + encoder.pos_conv_embed(tokens)
        if not self.stable_layer_norm:
            tokens = encoder.layer_norm(tokens)
        return encoder.dropout(tokens), frame_mask

    def layer_dropped(self, index: int) -> bool:
        layerdrop = self.model.config.layerdrop
        return self.model.encoder.training and layerdrop > 0 and bool(torch.rand(()) < layerdrop)
