"""`activation_checkpointing: True` recomputes each layer in backward: same outputs and gradients, less memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build_model, waveforms, write_checkpoints

from petl_apps.benchmark import saved_activation_bytes
from petl_modules import load_hparams
from petl_modules.hparams_loader import LIBRARY_HPARAMS

# Methods whose injected modules read per-layer state (padding mask, prompts that change the token count,
# dropout inside the backbone for full fine-tuning) are the ones recomputation could get wrong.
VARIANTS = [
    ("full_ft", {}),
    ("adapter", {"reduction_rate": 4, "adapter_block": "conformer", "kernel_size": 3}),
    ("prompt_tuning", {"prompt_len": 3, "deep": True, "dropout": 0.2}),
    ("prefix_tuning", {"prefix_len": 2}),
    ("lora", {"reduction_rate": 8, "dropout": 0.2}),
    ("soft_moa", {"num_adapters": 3, "reduction_rate": 4}),
]
IDS = [method for method, _ in VARIANTS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def count_layer_calls(model) -> list[int]:
    """A counter of the backbone's layer runs (a forward hook would miss the recomputation)."""
    calls, run_layer = [0], model.backbone._run_layer

    def counted(*args, **kwargs):
        calls[0] += 1
        return run_layer(*args, **kwargs)

    model.backbone._run_layer = counted
    return calls


def forward_backward(model, wavs, lens, seed: int = 3):
    torch.manual_seed(seed)  # the same dropout and LayerDrop draws in both models
    np.random.seed(seed)  # Wav2Vec2's time masking (full fine-tuning) draws from NumPy
    logits = model(wavs, lens)
    (logits * torch.arange(1.0, logits.shape[1] + 1)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("name", ["ast", "wav2vec2"])
@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_checkpointed_layers_give_the_same_outputs_and_gradients(checkpoints, name, method, options):
    plain = build_model(checkpoints[name], method, **options).train()
    recomputed = build_model(checkpoints[name], method, **options).train()
    recomputed.backbone.activation_checkpointing = True
    plain_calls, recomputed_calls = count_layer_calls(plain), count_layer_calls(recomputed)
    wavs, lens = waveforms(batch=3, seconds=0.5)

    logits, grads = forward_backward(plain, wavs, lens)
    logits_ckpt, grads_ckpt = forward_backward(recomputed, wavs, lens)

    assert plain_calls[0] >= 1 and recomputed_calls == [2 * plain_calls[0]]  # each layer ran again in backward
    torch.testing.assert_close(logits_ckpt, logits)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for key, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5, msg=f"{key} differs")


def test_checkpointing_keeps_fewer_activations_and_is_off_at_inference(checkpoints):
    model = build_model(checkpoints["ast"], "full_ft").train()
    wavs, lens = waveforms(batch=2, seconds=0.5)
    plain = saved_activation_bytes(lambda: model(wavs, lens))
    model.backbone.activation_checkpointing = True
    recomputed = saved_activation_bytes(lambda: model(wavs, lens))
    assert recomputed < 0.5 * plain  # two tiny layers: only each layer's input is kept, not its internals

    calls = count_layer_calls(model)
    with torch.no_grad():
        model(wavs, lens)
    model.eval()
    model(wavs, lens).sum().backward()
    assert calls == [
        2 * len(model.backbone.layers)
    ]  # once per forward: no recomputation without gradients or in eval mode


def test_the_option_is_a_model_block_key(checkpoints):
    method = LIBRARY_HPARAMS / "methods" / "lora.yaml"
    overrides = {"backbone_source": str(checkpoints["ast"]), "target_length": 100}
    assert (
        load_hparams(method, overrides, defaults=(LIBRARY_HPARAMS / "model.yaml",))[
            "model"
        ].backbone.activation_checkpointing
        is False
    )
    hparams = load_hparams(
        method, {**overrides, "activation_checkpointing": True}, defaults=(LIBRARY_HPARAMS / "model.yaml",)
    )
    assert hparams["model"].backbone.activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing must be .*True or False.*'yes'"):
        load_hparams(
            method, {**overrides, "activation_checkpointing": "yes"}, defaults=(LIBRARY_HPARAMS / "model.yaml",)
        )
