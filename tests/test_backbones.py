"""Backbones: checkpoint loading, the AST input pipeline, positional embeddings, our forward loop."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import waveforms, write_checkpoints
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel, Wav2Vec2Model

from petl_modules.backbones import ASTBackbone, BackboneLoadError, Wav2Vec2Backbone, build_backbone
from petl_modules.backbones.ast import AUDIOSET_MEAN, AUDIOSET_STD, FbankFrontEnd
from petl_modules.random_backbones import backbone_config, write_random_checkpoint

# transformers 5.x names -> the 4.x names of the hub checkpoints (ViT layout).
LEGACY_NAMES = [
    (r"\.layers\.(\d+)\.", r".encoder.layer.\1."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def write_legacy_ast_checkpoint(folder, config: ASTConfig) -> dict[str, torch.Tensor]:
    """An ASTForAudioClassification saved with transformers 4.x key names, as on the hub."""
    torch.manual_seed(0)
    model = ASTForAudioClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    state = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in LEGACY_NAMES:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.contiguous()
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["architectures"] = ["ASTForAudioClassification"]
    (folder / "config.json").write_text(json.dumps(config_dict))
    return state


def test_checkpoint_with_transformers_4_names_loads_with_no_missing_key(tmp_path):
    config = backbone_config("ast", num_labels=7)
    legacy = write_legacy_ast_checkpoint(tmp_path / "legacy", config)
    assert "audio_spectrogram_transformer.encoder.layer.0.attention.attention.query.weight" in legacy
    backbone = ASTBackbone(str(tmp_path / "legacy"), target_length=1024)  # raises on any missing key
    layer = backbone.model.layers[1]
    torch.testing.assert_close(
        layer.attention.q_proj.weight,
        legacy["audio_spectrogram_transformer.encoder.layer.1.attention.attention.query.weight"],
    )
    torch.testing.assert_close(
        layer.mlp.fc2.bias, legacy["audio_spectrogram_transformer.encoder.layer.1.output.dense.bias"]
    )
    torch.testing.assert_close(
        backbone.model.embeddings.position_embeddings,
        legacy["audio_spectrogram_transformer.embeddings.position_embeddings"],
    )


@pytest.mark.parametrize(("frames", "columns"), [(100, 9), (400, 39), (500, 49), (800, 79), (1024, 101)])
def test_positional_grid_is_the_checkpoint_grid_cropped_around_its_centre(checkpoints, frames, columns):
    table = ASTModel.from_pretrained(checkpoints["ast"]).embeddings.position_embeddings.detach()
    grid = table[:, 2:].reshape(1, 12, 101, -1)
    start = 101 // 2 - columns // 2
    expected = torch.cat([table[:, :2], grid[:, :, start : start + columns].reshape(1, 12 * columns, -1)], dim=1)

    adapted = ASTBackbone(str(checkpoints["ast"]), target_length=frames).model.embeddings.position_embeddings
    assert adapted.shape == (1, 2 + 12 * columns, 32)
    torch.testing.assert_close(adapted.detach(), expected, rtol=0, atol=0)
    assert adapted.abs().min(dim=-1).values.min() > 0  # never the reference's all-zero table


def test_positional_grid_is_interpolated_for_longer_inputs(checkpoints):
    table = ASTModel.from_pretrained(checkpoints["ast"]).embeddings.position_embeddings.detach()
    grid = table[:, 2:].reshape(1, 12, 101, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(12, 119), mode="bilinear", align_corners=False)
    adapted = ASTBackbone(str(checkpoints["ast"]), target_length=1200).model.embeddings.position_embeddings
    torch.testing.assert_close(adapted[:, 2:].detach(), expected.permute(0, 2, 3, 1).reshape(1, 12 * 119, -1))
    torch.testing.assert_close(adapted[:, :2].detach(), table[:, :2])


@pytest.mark.parametrize("seconds", [0.6, 1.0, 1.4])
def test_fbank_front_end_matches_the_checkpoint_feature_extractor(seconds):
    wav = torch.randn(int(16000 * seconds)) * 0.1
    reference = ASTFeatureExtractor(max_length=100, mean=AUDIOSET_MEAN, std=AUDIOSET_STD)(
        wav.numpy(), sampling_rate=16000, return_tensors="pt"
    )["input_values"]
    ours = FbankFrontEnd(target_length=100)(wav[None])
    assert ours.shape == (1, 100, 128)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_front_end_uses_each_utterance_own_length():
    wav = torch.randn(16000) * 0.1
    padded = torch.nn.functional.pad(wav[:9600], (0, 6400))
    front_end = FbankFrontEnd(target_length=100)
    batch = front_end(torch.stack([wav, padded]), torch.tensor([1.0, 0.6]))
    torch.testing.assert_close(batch[1], front_end(wav[None, :9600])[0])


def test_ast_forward_loop_equals_the_hugging_face_forward(checkpoints):
    backbone = ASTBackbone(str(checkpoints["ast"]), target_length=100).eval()
    wavs, _ = waveforms()
    with torch.no_grad():
        tokens, mask = backbone(wavs)
        features = backbone.front_end(wavs)
        reference = backbone.model(features).last_hidden_state
    assert mask is None
    torch.testing.assert_close(backbone.final_norm(tokens), reference)


@pytest.mark.parametrize("name", ["wav2vec2", "wav2vec2_stable"])
def test_wav2vec2_forward_loop_equals_the_hugging_face_forward(checkpoints, name):
    backbone = Wav2Vec2Backbone(str(checkpoints[name])).eval()
    reference_model = Wav2Vec2Model.from_pretrained(checkpoints[name]).eval()
    wav = waveforms()[0][:1]
    # What the checkpoint's feature extractor does before the model (do_normalize).
    normalised = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        ours, mask = backbone(wav)
        reference = reference_model(normalised).last_hidden_state
    if backbone.final_norm is not None:
        ours = backbone.final_norm(ours)
    assert mask is None
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_wav2vec2_frame_mask_follows_the_cnn_output_lengths(checkpoints):
    backbone = Wav2Vec2Backbone(str(checkpoints["wav2vec2"])).eval()
    wavs, lens = waveforms(batch=3)
    with torch.no_grad():
        tokens, mask = backbone(wavs, lens)
    samples = (lens * wavs.shape[1]).round().long()
    expected = backbone.model._get_feat_extract_output_lengths(samples)
    assert mask.shape == tokens.shape[:2]
    assert mask.sum(1).tolist() == expected.tolist()


def test_missing_folder_is_one_clear_line(tmp_path):
    with pytest.raises(BackboneLoadError, match=r"^backbone_source '.*nowhere': folder not found; expected a Hugging "):
        build_backbone("ast", str(tmp_path / "nowhere"))


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(BackboneLoadError, match="no config.json in this folder"):
        build_backbone("ast", str(tmp_path))


def test_wrong_architecture_is_named(checkpoints):
    with pytest.raises(
        BackboneLoadError, match="model_type is 'wav2vec2', expected one of audio-spectrogram-transformer"
    ):
        build_backbone("ast", str(checkpoints["wav2vec2"]))
    with pytest.raises(
        BackboneLoadError, match="model_type is 'audio-spectrogram-transformer', expected one of wav2vec2"
    ):
        build_backbone("wav2vec2", str(checkpoints["ast"]))


def test_unreachable_hub_model_says_how_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError) as error:
        build_backbone("ast", "MIT/ast-finetuned-audioset-10-10-0.4593")
    message = str(error.value)
    assert "\n" not in message
    assert "not a local folder and the Hugging Face hub could not provide it" in message
    assert "--backbone_source=DIR" in message


def test_incomplete_checkpoint_is_refused(tmp_path, checkpoints):
    folder = write_random_checkpoint("ast", tmp_path / "ast")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state.pop(next(name for name in state if "position_embeddings" in name))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneLoadError, match="1 weights missing from the checkpoint .*position_embeddings"):
        build_backbone("ast", str(folder))


def test_unknown_backbone_kind_is_named():
    with pytest.raises(
        ValueError, match="backbone must be one of ast, wav2vec2, hubert, data2vec, wavlm, whisper; got 'beats'"
    ):
        build_backbone("beats")


def test_hubert_uses_the_same_injection(tmp_path):
    from petl_modules.methods import SoftMoA
    from petl_modules.model import PETLModel

    folder = write_random_checkpoint("hubert", tmp_path / "hubert")
    model = PETLModel(build_backbone("hubert", str(folder)), SoftMoA(num_adapters=2, reduction_rate=4), 3).eval()
    wavs, lens = waveforms()
    assert model(wavs, lens).shape == (3, 3)


def test_cached_fbank_gives_the_same_logits_and_is_computed_once(checkpoints, tmp_path):
    import soundfile
    from tiny_models import build_model

    from petl_modules.data import AudioError, FeatureCache, read_audio

    model = build_model(checkpoints["ast"], "adapter", reduction_rate=4).eval()
    front_end = model.backbone.front_end
    paths = []
    for index, seconds in enumerate((1.0, 0.6)):
        paths.append(tmp_path / f"clip{index}.wav")
        soundfile.write(paths[-1], (torch.randn(int(16000 * seconds)) * 0.1).numpy(), 16000)
    cache = FeatureCache(tmp_path / "cache", front_end.single, front_end.settings())
    features = torch.stack([cache(path) for path in paths])
    assert len(list(cache.folder.glob("*.pt"))) == 2
    assert torch.equal(torch.stack([cache(path) for path in paths]), features)  # read back, not recomputed

    wavs = torch.nn.functional.pad(read_audio(paths[1]), (0, 6400))
    wavs = torch.stack([read_audio(paths[0]), wavs])
    with torch.no_grad():
        torch.testing.assert_close(model(features), model(wavs, torch.tensor([1.0, 0.6])))
    other = FeatureCache(tmp_path / "cache", front_end.single, {**front_end.settings(), "target_length": 50})
    assert other.folder != cache.folder  # other settings never read these features
    with pytest.raises(AudioError, match=r"missing\.wav: audio file not found"):
        cache(tmp_path / "missing.wav")


QUIET = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)


@pytest.mark.parametrize("layerdrop", [0.0, 1.0])
def test_wav2vec2_layerdrop_acts_in_training_mode_only(tmp_path, layerdrop):
    """The reference's full fine-tuning runs in training mode: the checkpoint's LayerDrop skips layers."""
    folder = write_random_checkpoint("wav2vec2", tmp_path / "w2v", layerdrop=layerdrop, mask_time_prob=0.0, **QUIET)
    backbone = Wav2Vec2Backbone(str(folder))
    calls = []
    for layer in backbone.layers:
        layer.register_forward_hook(lambda *args: calls.append(1))
    wavs, lens = waveforms()
    with torch.no_grad():
        backbone.eval()
        backbone(wavs, lens)
        assert len(calls) == len(backbone.layers)
        backbone.train()
        embedded, _ = backbone.embed(wavs, lens)
        tokens, _ = backbone(wavs, lens)
    if layerdrop == 1.0:  # every layer skipped: the output is the encoder's input
        assert len(calls) == len(backbone.layers)
        torch.testing.assert_close(tokens, embedded, rtol=0, atol=0)
    else:
        assert len(calls) == 2 * len(backbone.layers)


def test_wav2vec2_time_masking_acts_in_training_mode_only(tmp_path):
    """Frames replaced by the checkpoint's learned mask embedding (`mask_time_prob`), as in Hugging Face's forward."""
    folder = write_random_checkpoint(
        "wav2vec2", tmp_path / "w2v", layerdrop=0.0, mask_time_prob=0.5, mask_time_length=2, **QUIET
    )
    backbone = Wav2Vec2Backbone(str(folder))
    with torch.no_grad():
        backbone.model.masked_spec_embed.normal_()
    seen = []
    backbone.model.encoder.pos_conv_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    wavs, lens = waveforms()
    with torch.no_grad():
        backbone.eval()(wavs, lens)
        backbone.train()(wavs, lens)
    masked = [(frames == backbone.model.masked_spec_embed).all(dim=-1) for frames in seen]
    assert not masked[0].any()
    assert 0.2 < masked[1].float().mean() < 0.9
