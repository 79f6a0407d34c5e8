"""The pretraining recipe writes a Hugging Face AST folder the backbones load; the random-weights control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchaudio

from petl_apps.pretrain import INFO, PretrainSettings, main, pretrain, random_init_backbone
from petl_apps.speech import PRETRAIN_WORDS, speaker_splits, synthesize_clips
from petl_modules.backbones import build_backbone

TINY = PretrainSettings(num_words=3, num_speakers=2, epochs=1, batch_size=4, hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrain") / "ast", TINY, progress=False)


def test_pretraining_writes_a_loadable_folder_with_the_data_statistics(pretrained):
    assert sorted(p.name for p in pretrained.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        INFO,
    ]
    config = json.loads((pretrained / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == (
        "audio-spectrogram-transformer",
        32,
        1,
    )
    # The statistics, recomputed from the same clips with torchaudio's Kaldi fbank directly.
    speakers = speaker_splits(TINY.seed)["pretrain"][: TINY.num_speakers]
    clips = [clip for _, clip in synthesize_clips(PRETRAIN_WORDS[:3], speakers, 1, seed=TINY.seed)]
    fbanks = [
        torchaudio.compliance.kaldi.fbank(
            torch.from_numpy(clip)[None],
            htk_compat=True,
            sample_frequency=16000,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=128,
            dither=0.0,
            frame_shift=10,
        )
        for clip in clips
    ]
    values = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, 100 - len(f))) for f in fbanks])
    preprocessor = json.loads((pretrained / "preprocessor_config.json").read_text())
    assert preprocessor["mean"] == pytest.approx(values.mean().item(), rel=1e-4)
    assert preprocessor["std"] == pytest.approx(values.std().item(), rel=1e-4)

    backbone = build_backbone("ast", str(pretrained), target_length=100)
    assert backbone.front_end.settings()["mean"] == preprocessor["mean"]
    assert backbone(torch.randn(2, 16000))[0].shape[-1] == 32  # (batch, tokens, hidden)


def test_a_finished_pretraining_is_reused_and_other_settings_retrain(pretrained, tmp_path):
    stamp = (pretrained / INFO).stat().st_mtime_ns
    pretrain(pretrained, TINY, progress=False)
    assert (pretrained / INFO).stat().st_mtime_ns == stamp
    (tmp_path / "ast").mkdir()
    (tmp_path / "ast" / INFO).write_text(json.dumps({"settings": {}}))  # an unfinished or other run
    assert (
        main(
            [
                "--output_folder",
                str(tmp_path / "ast"),
                "--num_words=3",
                "--num_speakers=2",
                "--epochs=1",
                "--batch_size=4",
                "--hidden_size=32",
                "--num_layers=1",
                "--num_heads=2",
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "ast" / INFO).read_text())
    assert info["settings"] == json.loads((pretrained / INFO).read_text())["settings"]
    assert info["items"] == 3 * 2


def test_pretraining_is_reproducible(pretrained, tmp_path):
    again = pretrain(tmp_path / "ast", TINY, progress=False)
    assert (again / "model.safetensors").read_bytes() == (pretrained / "model.safetensors").read_bytes()


def test_the_random_weights_control_keeps_architecture_and_input_normalisation(pretrained):
    trained = build_backbone("ast", str(pretrained), target_length=100)
    control = random_init_backbone("ast", str(pretrained), target_length=100, seed=0)
    assert control.front_end.settings() == trained.front_end.settings()
    shapes = {name: p.shape for name, p in trained.named_parameters()}
    assert {name: p.shape for name, p in control.named_parameters()} == shapes
    differing = [
        name
        for (name, a), b in zip(trained.named_parameters(), control.parameters())
        if a.std() > 0 and not torch.equal(a, b)
    ]
    assert len(differing) == sum(1 for _, p in trained.named_parameters() if p.std() > 0)
    again = random_init_backbone("ast", str(pretrained), target_length=100, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(control.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="ast backbone"):
        random_init_backbone("wav2vec2", str(pretrained), target_length=100)
    assert np.isfinite(control(torch.randn(1, 16000))[0].detach().numpy()).all()
