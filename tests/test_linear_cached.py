"""Linear probing from cached pooled features equals the full forward, on tiny backbones."""

from __future__ import annotations

import os

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from tiny_models import TARGET_LENGTH, waveforms, write_checkpoints

from petl_modules.backbones import build_backbone
from petl_modules.data.audio import read_audio
from petl_modules.data.embedding_cache import embedding_cache
from petl_modules.linear_cached import (
    check_cacheable,
    head_norm,
    logits_from_pooled,
    pooled_features,
    recipe_cache_blocker,
)
from petl_modules.methods import METHODS
from petl_modules.model import PETLModel

# (checkpoint, pooling, padded batch, model options). AST and LayerNorm-CNN Wav2Vec2 are exact in a padded
# batch; the base (GroupNorm CNN) Wav2Vec2 normalises over the padded input, so it is compared at equal lengths.
CASES = [
    ("ast", "mean", True, {}),
    ("ast", "cls", True, {}),
    ("ast", "cls_dist", True, {}),
    ("wav2vec2_stable", "mean", True, {}),  # the backbone's final LayerNorm trains
    ("wav2vec2", "mean", False, {"train_final_norm": False}),  # the reference head: the Linear alone
    ("wav2vec2", "mean", False, {"head_norm": True}),  # a trainable LayerNorm in the head
    ("wav2vec2_stable", "mean", True, {"head_norm": True, "train_final_norm": False}),  # frozen final + head norm
]
IDS = [
    f"{name}-{pooling}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}"
    for name, pooling, _, options in CASES
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def linear_probe(checkpoint, pooling: str = "mean", seed: int = 0, **options) -> PETLModel:
    """A linear-probing model whose trained tensors and final LayerNorm (even frozen) are random: gamma = 1,
    beta = 0 would hide a missing or misplaced affine part."""
    kind = "ast" if "ast" in checkpoint.name else "wav2vec2"
    backbone = build_backbone(kind, str(checkpoint), target_length=TARGET_LENGTH)
    torch.manual_seed(seed)
    model = PETLModel(backbone, METHODS["linear"](), num_classes=5, pooling=pooling, **options)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        final_norm = list(backbone.final_norm.parameters()) if backbone.final_norm is not None else []
        for parameter in dict.fromkeys([*trained_tensors(model).values(), *final_norm]):  # ordered, once each
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.train()


def trained_tensors(model) -> dict[str, torch.nn.Parameter]:
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.linear.weight", "head.linear.bias"} <= trained.keys()
    return trained


def batch(padded: bool):
    wavs, lens = waveforms(batch=3, seconds=0.5)
    return wavs, lens if padded else None


@pytest.mark.parametrize(("name", "pooling", "padded", "options"), CASES, ids=IDS)
def test_cached_path_gives_the_full_forward_logits_and_gradients(checkpoints, name, pooling, padded, options):
    model = linear_probe(checkpoints[name], pooling, **options)
    wavs, lens = batch(padded)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))  # a loss with distinct gradients

    full = model(wavs, lens)
    (full * weights).sum().backward()
    full_grads = {key: p.grad.clone() for key, p in trained_tensors(model).items()}
    model.zero_grad()

    cached = logits_from_pooled(model, pooled_features(model, wavs, lens))
    (cached * weights).sum().backward()

    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    for key, parameter in trained_tensors(model).items():
        # float32 sums over tokens in a different order: 1e-4 relative (a wrong affine part is off by O(1))
        torch.testing.assert_close(parameter.grad, full_grads[key], atol=1e-4, rtol=1e-4, msg=key)
    assert all(p.grad is None for p in model.backbone.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("name", "pooling", "padded", "options"), CASES, ids=IDS)
def test_training_from_the_cache_reaches_the_same_head_as_training_end_to_end(
    checkpoints, name, pooling, padded, options
):
    """A few SGD steps on both paths from the same start: same trained tensors, hence the same accuracy."""
    wavs, lens = batch(padded)
    targets = torch.tensor([0, 3, 1])
    end_to_end = linear_probe(checkpoints[name], pooling, **options)
    from_cache = linear_probe(checkpoints[name], pooling, **options)
    pooled = pooled_features(from_cache, wavs, lens)  # computed once, as the cache would hold it
    for model, forward in (
        (end_to_end, lambda m: m(wavs, lens)),
        (from_cache, lambda m: logits_from_pooled(m, pooled)),
    ):
        # SGD: Adam's per-element normalisation would blow float noise on near-zero gradients up to lr
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(forward(model), targets).backward()
            optimizer.step()
    start = linear_probe(checkpoints[name], pooling, **options)
    for key, parameter in trained_tensors(from_cache).items():
        assert not torch.allclose(parameter, trained_tensors(start)[key]), f"{key} did not train"
        torch.testing.assert_close(
            parameter, trained_tensors(end_to_end)[key], atol=1e-5, rtol=1e-4, msg=f"{key} differs"
        )


def test_pooled_mean_is_the_mean_of_the_normalised_real_tokens(checkpoints):
    """Closed form on the padded LayerNorm-CNN Wav2Vec2: per item, (x - mean) / sqrt(var + eps) averaged over
    its real frames only, computed here item by item without the head's pooling code."""
    model = linear_probe(checkpoints["wav2vec2_stable"], "mean")
    wavs, lens = batch(padded=True)
    pooled = pooled_features(model, wavs, lens)
    tokens, mask = model.backbone(wavs, lens)
    eps = head_norm(model).eps
    for index in range(len(wavs)):
        real = tokens[index, : int(mask[index].sum())].detach().double()
        normalised = (real - real.mean(-1, keepdim=True)) / torch.sqrt(real.var(-1, unbiased=False, keepdim=True) + eps)
        torch.testing.assert_close(pooled[index].double(), normalised.mean(0), atol=1e-5, rtol=1e-5)
    assert mask[-1].sum() < mask[0].sum()  # the batch really is padded


def write_wavs(folder, count: int = 3):
    wavs, _ = waveforms(batch=count, seconds=0.5)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, wav in enumerate(wavs):
        path = folder / f"clip{index}.wav"
        sf.write(path, wav.numpy(), 16000, subtype="FLOAT")
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["ast", "wav2vec2"])
def test_cache_stores_each_file_once_and_gives_the_file_alone_vector(checkpoints, tmp_path, name):
    model = linear_probe(checkpoints[name], "mean")
    paths = write_wavs(tmp_path / "audio")
    cache = embedding_cache(tmp_path / "cache", model)
    first = [cache(path) for path in paths]
    entries = sorted(cache.folder.glob("*.pt"))
    assert len(entries) == len(paths) and (cache.folder / "settings.json").is_file()
    assert not list(cache.folder.glob(".*.tmp"))  # atomic writes leave no temporary behind

    for path, vector in zip(paths, first):
        expected = pooled_features(model, read_audio(path)[None])[0]
        torch.testing.assert_close(vector, expected)
        assert vector.shape == (model.backbone.hidden_size,)

    stamps = [os.stat(entry).st_mtime_ns for entry in entries]
    again = embedding_cache(tmp_path / "cache", model)
    for path, vector in zip(paths, first):
        torch.testing.assert_close(again(path), vector)
    assert [os.stat(entry).st_mtime_ns for entry in entries] == stamps  # read back, not recomputed


def test_cache_key_follows_pooling_and_backbone_weights(checkpoints, tmp_path):
    mean = embedding_cache(tmp_path, linear_probe(checkpoints["ast"], "mean"))
    cls = embedding_cache(tmp_path, linear_probe(checkpoints["ast"], "cls"))
    other = embedding_cache(tmp_path, linear_probe(checkpoints["wav2vec2"], "mean"))
    assert len({mean.folder, cls.folder, other.folder}) == 3
    weights = next(checkpoints["ast"].glob("*.safetensors"))  # touched, same weights: same vectors, same key
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert embedding_cache(tmp_path, linear_probe(checkpoints["ast"], "mean")).folder == mean.folder
    # The same source with other weights (the demo's random-init control) never reads these vectors.
    probe = linear_probe(checkpoints["ast"], "mean")
    with torch.no_grad():
        next(probe.backbone.model.parameters()).add_(1.0)
    assert embedding_cache(tmp_path, probe).folder != mean.folder


def test_cache_refuses_methods_and_inputs_that_change_during_training(checkpoints, tmp_path):
    backbone = build_backbone("ast", str(checkpoints["ast"]), target_length=TARGET_LENGTH)
    lora = PETLModel(backbone, METHODS["lora"](reduction_rate=8), num_classes=5)
    with pytest.raises(ValueError, match="need method linear.*lora"):
        embedding_cache(tmp_path, lora)
    two_norms = linear_probe(checkpoints["wav2vec2_stable"], head_norm=True, train_final_norm=True)
    with pytest.raises(ValueError, match="head_norm: True .* need train_final_norm: False"):
        pooled_features(two_norms, *waveforms(2))
    with pytest.raises(ValueError, match="deterministic input: set spec_augment: False"):
        check_cacheable(linear_probe(checkpoints["ast"], "mean"), augmentation=True)
    # SpecAugment runs on a front end's features only: a waveform backbone's recipe run still caches.
    assert recipe_cache_blocker(linear_probe(checkpoints["wav2vec2_stable"]), True, spec_augment=True) is None
    assert "deterministic input" in recipe_cache_blocker(linear_probe(checkpoints["ast"]), True, spec_augment=True)
