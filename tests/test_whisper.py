"""The Whisper encoder: its log-mel front end, the 30 s window against Hugging Face's forward, the clip window
against Hugging Face's encoder built for it, its options, and LoRA in the export forms.

The method matrix, summary and a recipe run on Whisper are in tests/test_new_backbones.py. Tiny random
checkpoint: hidden 32, 2 pre-LN layers, 4 heads, FFN 64, 80 mel bins, 1500 positions (the 30 s window).
"""

from __future__ import annotations

import json
import sys

import peft
import pytest
import safetensors.torch
import torch
from tiny_models import waveforms
from transformers import WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from petl_modules import export, random_backbones
from petl_modules.backbones import build_backbone
from petl_modules.backbones.base import OptionError
from petl_modules.hparams_checks import check_settings
from petl_modules.hparams_loader import HparamsError
from petl_modules.methods import METHODS
from petl_modules.model import PETLModel
from petl_modules.random_backbones import backbone_config, write_random_checkpoint

D, HEADS, CLIP = 32, 4, 100  # CLIP: the clip window's frames (1 s), 50 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint("whisper", tmp_path_factory.mktemp("whisper") / "whisper")


def hugging_face_features(folder, wavs, lens, frames: int) -> torch.Tensor:
    """The checkpoint's feature extractor on each file's real samples, padded to `frames` hops: (batch, mel, frames)."""
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    real = [wav[: round(float(length) * wavs.shape[1])].numpy() for wav, length in zip(wavs, lens)]
    padding = {} if frames == 3000 else {"max_length": frames * 160}
    return extractor(real, sampling_rate=16000, return_tensors="pt", **padding).input_features


def last_hidden_state(backbone, wavs, lens):
    tokens, mask = backbone(wavs, lens)
    assert mask is None  # no token is padding
    return backbone.final_norm(tokens)


def test_30s_window_equals_hugging_face_exactly(checkpoint):
    """Unequal lengths: Hugging Face's extractor pads each file to 30 s, as our front end does file by file."""
    backbone = build_backbone("whisper", str(checkpoint), whisper_window="30s").eval()
    reference = WhisperModel.from_pretrained(checkpoint).encoder.eval()
    wavs, lens = waveforms(batch=3, seconds=1.0)
    with torch.no_grad():
        ours = last_hidden_state(backbone, wavs, lens)
        theirs = reference(hugging_face_features(checkpoint, wavs, lens, 3000)).last_hidden_state
    assert ours.shape == (3, 1500, D)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_clip_window_equals_hugging_face_encoder_with_the_cut_table(checkpoint):
    """The clip window is Hugging Face's encoder for a window of CLIP frames: max_source_positions CLIP / 2 and
    the checkpoint's first CLIP / 2 positional rows (Hugging Face insists on exactly that many frames)."""
    backbone = build_backbone("whisper", str(checkpoint), target_length=CLIP).eval()
    full = WhisperModel.from_pretrained(checkpoint).encoder
    reference = WhisperModel.from_pretrained(
        checkpoint, max_source_positions=CLIP // 2, ignore_mismatched_sizes=True
    ).encoder.eval()
    reference.embed_positions.weight.data.copy_(full.embed_positions.weight.data[: CLIP // 2])
    wavs, lens = waveforms(batch=3, seconds=1.5)  # longer than the window: cut, as Hugging Face truncates
    with torch.no_grad():
        ours = last_hidden_state(backbone, wavs, lens)
        theirs = reference(hugging_face_features(checkpoint, wavs, lens, CLIP)).last_hidden_state
        alone = torch.cat([last_hidden_state(backbone, wavs[i : i + 1], lens[i : i + 1]) for i in range(3)])
    assert ours.shape == (3, CLIP // 2, D)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(alone, ours, rtol=0, atol=1e-6)  # padding-invariant: features file by file
    assert backbone.padding_invariant


def test_clip_window_costs_a_fraction_of_the_30s_window(checkpoint):
    """Tokens and positional rows follow the window: 50 for 1 s, 1500 for 30 s."""
    clip = build_backbone("whisper", str(checkpoint), target_length=CLIP)
    window = build_backbone("whisper", str(checkpoint), whisper_window="30s", target_length=CLIP)
    assert clip.model.embed_positions.num_embeddings == CLIP // 2
    assert window.model.embed_positions.num_embeddings == 1500
    assert clip.adapted_checkpoint()[1] == {"max_source_positions": CLIP // 2}
    assert window.adapted_checkpoint() is None
    whole = build_backbone("whisper", str(checkpoint), target_length=3000)  # the clip window at 30 s: no cut
    assert whole.model.embed_positions.num_embeddings == 1500 and whole.adapted_checkpoint() is None
    assert clip.preprocessor_config()["nb_max_frames"] == CLIP and clip.preprocessor_config()["chunk_length"] == 1
    assert clip.input_settings() == {
        "input": "log_mel",
        "whisper_window": "clip",
        "front_end": "whisper_log_mel",
        "target_length": CLIP,
        "num_mel_bins": 80,
        "sample_rate": 16000,
        "n_fft": 400,
        "hop_length": 160,
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_length": 101}, "target_length must be an even number of frames from 2 to 3000 .* got 101$"),
        ({"target_length": 3002}, "target_length must be an even number of frames from 2 to 3000 .* got 3002$"),
        ({"whisper_window": "60s"}, r"^whisper_window must be one of clip, 30s; got '60s'$"),
    ],
)
def test_window_options_out_of_range_are_one_line(checkpoint, options, message):
    with pytest.raises(OptionError, match=message):
        build_backbone("whisper", str(checkpoint), **options)


def test_recipe_setting_whisper_window_is_checked_before_anything_runs():
    check_settings({"whisper_window": "30s"})
    with pytest.raises(HparamsError, match=r"^--whisper_window must be one of clip, 30s; got '30 s'$"):
        check_settings({"whisper_window": "30 s"})


def test_feed_forward_view_keeps_hugging_face_names(checkpoint):
    """The FFN the methods wrap is a view of fc1 and fc2: no tensor of its own, Hugging Face's state-dict names."""
    backbone = build_backbone("whisper", str(checkpoint), whisper_window="30s")
    reference = WhisperModel.from_pretrained(checkpoint).encoder
    assert list(backbone.model.state_dict()) == list(reference.state_dict())
    model = PETLModel(backbone, METHODS["adapter"](reduction_rate=8), 5)
    names = {name for name, _ in model.backbone.model.named_parameters()}
    assert "layers.0.fc1.weight" in names and "layers.0.ffn.module.down.weight" in names


def test_random_backbones_command_writes_whisper_in_the_hub_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["random_backbones", "whisper", str(tmp_path / "w"), "--size", "tiny"])
    random_backbones.main()
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["architectures"]) == (
        D,
        2,
        ["WhisperForConditionalGeneration"],
    )
    assert json.loads((tmp_path / "w" / "preprocessor_config.json").read_text())["feature_size"] == 80
    base = backbone_config("whisper", "base")
    assert (base.d_model, base.encoder_layers, base.encoder_attention_heads, base.encoder_ffn_dim) == (512, 6, 8, 2048)


# --- LoRA in the export forms ----------------------------------------------------------------------------------


def trained_lora(checkpoint, train_final_norm: bool = False) -> PETLModel:
    """LoRA on the four projections with non-zero B; the final norm frozen (the model block's Whisper default)."""
    torch.manual_seed(0)
    model = PETLModel(
        build_backbone("whisper", str(checkpoint), target_length=CLIP),
        METHODS["lora"](reduction_rate=8, targets=["q", "k", "v", "o"]),
        5,
        train_final_norm=train_final_norm,
    ).eval()
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora.lora_B.weight.normal_(std=0.2)
    return model


def test_lora_merged_encoder_runs_in_hugging_face_and_here(checkpoint, tmp_path):
    """The merged folder holds the encoder alone (architectures WhisperEncoder) with the clip's table."""
    model = trained_lora(checkpoint)
    wavs, lens = waveforms(batch=2, seconds=1.0)
    with torch.no_grad():
        ours = last_hidden_state(model.backbone, wavs, lens)
        export.write_merged_backbone(model, tmp_path / "merged")
        merged = WhisperEncoder.from_pretrained(tmp_path / "merged").eval()
        theirs = merged(hugging_face_features(checkpoint, wavs, lens, CLIP)).last_hidden_state
        reloaded = build_backbone("whisper", str(tmp_path / "merged"), target_length=CLIP).eval()
        again = last_hidden_state(reloaded, wavs, lens)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["WhisperEncoder"]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, ours, rtol=1e-4, atol=1e-5)


def test_lora_peft_adapter_loads_on_the_encoder_of_whisper_model(checkpoint, tmp_path):
    """As export.json says: WhisperModel.from_pretrained(source, **base_model_kwargs).encoder, the cut table
    from position_embeddings.safetensors, then PeftModel.from_pretrained."""
    model = trained_lora(checkpoint)
    (tmp_path / "peft").mkdir()
    info = export.write_peft_adapter(model, tmp_path / "peft", str(checkpoint))
    assert (info["base_model_class"], info["base_model_attribute"]) == ("WhisperModel", "encoder")
    assert info["base_model_kwargs"] == {"max_source_positions": CLIP // 2, "ignore_mismatched_sizes": True}
    base = getattr(WhisperModel.from_pretrained(checkpoint, **info["base_model_kwargs"]), info["base_model_attribute"])
    positions = safetensors.torch.load_file(tmp_path / "peft" / info["position_embeddings"])
    base.load_state_dict(positions, strict=False)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    wavs, lens = waveforms(batch=2, seconds=1.0)
    with torch.no_grad():
        theirs = adapted(hugging_face_features(checkpoint, wavs, lens, CLIP)).last_hidden_state
        ours = last_hidden_state(model.backbone, wavs, lens)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_peft_format_refuses_a_trained_final_norm_whose_name_ends_others(checkpoint, tmp_path):
    """PEFT picks modules_to_save by name suffix: `layer_norm` would also pick every `*_layer_norm`."""
    model = trained_lora(checkpoint, train_final_norm=True)
    with pytest.raises(export.InferenceError, match=r"^--format peft: PEFT cannot save .* 'layer_norm' .*--merge"):
        export.write_peft_adapter(model, tmp_path, str(checkpoint))
