"""The tuning methods' contract, on tiny AST and Wav2Vec2 backbones (issue: the PETL library)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_model, waveforms, write_checkpoints

D, LAYERS, FFN, CLASSES = 32, 2, 64, 5  # the tiny checkpoints' sizes

# (method, options): every method and the options that change its structure.
VARIANTS = [
    ("linear", {}),
    ("full_ft", {}),
    ("full_ft", {"num_trainable_layers": 1}),
    ("adapter", {"reduction_rate": 4}),
    ("adapter", {"reduction_rate": 4, "adapter_type": "Houlsby"}),
    ("adapter", {"reduction_rate": 4, "seq_or_par": "sequential", "apply_residual": True}),
    ("adapter", {"reduction_rate": 4, "adapter_block": "conformer", "kernel_size": 5}),
    ("adapter", {"reduction_rate": 8, "adapter_block": "conformer", "adapter_type": "Houlsby"}),
    ("prompt_tuning", {"prompt_len": 3}),
    ("prompt_tuning", {"prompt_len": 3, "deep": True}),
    ("prefix_tuning", {"prefix_len": 2}),
    ("lora", {"reduction_rate": 8}),
    ("lora", {"reduction_rate": 8, "targets": ["q", "k", "v", "o"], "alpha": 4}),
    ("bitfit", {}),
    ("dense_moa", {"num_adapters": 3, "reduction_rate": 4}),
    (
        "dense_moa",
        {"num_adapters": 2, "reduction_rate": 4, "location": "both", "adapter_block": "conformer", "kernel_size": 3},
    ),
    ("soft_moa", {"num_adapters": 3, "reduction_rate": 4}),
    ("soft_moa", {"num_adapters": 3, "num_slots": 2, "normalize": True, "reduction_rate": 4, "location": "FFN"}),
    (
        "soft_moa",
        {"num_adapters": 2, "reduction_rate": 4, "location": "both", "adapter_block": "conformer", "kernel_size": 3},
    ),
]
IDS = [f"{method}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}" for method, options in VARIANTS]
# Methods whose freshly added modules must leave the backbone's output unchanged.
IDENTITY_AT_START = [
    (m, o)
    for m, o in VARIANTS
    if m in ("adapter", "lora", "dense_moa", "soft_moa")
    and (o.get("seq_or_par") != "sequential" or o.get("apply_residual"))
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(params=["ast", "wav2vec2", "wav2vec2_stable"])
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


def bottleneck_params(b: int) -> int:
    return 2 * D * b + b + D


def conformer_params(b: int, k: int) -> int:
    return 2 * D + (D * 2 * b + 2 * b) + (b * k + b) + 2 * b + (b * D + D)


def expected_method_params(method: str, options: dict, model) -> int:
    """Closed-form trainable parameters of the method alone (head and final norm excluded)."""
    if method == "linear":
        return 0
    if method == "full_ft":
        if options.get("num_trainable_layers"):
            return options["num_trainable_layers"] * sum(p.numel() for p in model.backbone.layers[-1].parameters())
        frozen = sum(p.numel() for p in model.backbone.always_frozen())
        norm = model.backbone.final_norm
        return model.backbone_parameters() - frozen - (sum(p.numel() for p in norm.parameters()) if norm else 0)
    if method == "adapter":
        b = D // options["reduction_rate"]
        block = (
            conformer_params(b, options.get("kernel_size", 31))
            if options.get("adapter_block") == "conformer"
            else bottleneck_params(b)
        )
        return LAYERS * (2 if options.get("adapter_type") == "Houlsby" else 1) * block
    if method == "prompt_tuning":
        return (LAYERS if options.get("deep") else 1) * options["prompt_len"] * D
    if method == "prefix_tuning":
        return LAYERS * 2 * options["prefix_len"] * D
    if method == "lora":
        rank = D // options["reduction_rate"]
        return LAYERS * len(options.get("targets", ["q", "v"])) * 2 * D * rank
    if method == "bitfit":
        per_layer = 4 * D + FFN + D + 2 * D  # q, k, v, o; fc1; fc2; two LayerNorms
        # Post-LN Wav2Vec2 normalises before its layers (a bias BitFit trains); pre-LN closes with the final norm.
        encoder_norm = D if "Wav2Vec2" in type(model.backbone).__name__ and model.backbone.final_norm is None else 0
        return LAYERS * per_layer + encoder_norm
    experts, b = options["num_adapters"], D // options["reduction_rate"]
    expert = (
        conformer_params(b, options["kernel_size"])
        if options.get("adapter_block") == "conformer"
        else bottleneck_params(b)
    )
    locations = 2 if options.get("location") == "both" else 1
    if method == "dense_moa":
        router = D * experts + experts
        return LAYERS * locations * (router + experts * expert)
    phi = D * experts * options.get("num_slots", 1) + (1 if options.get("normalize") else 0)
    return LAYERS * locations * (phi + experts * expert)


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_trainable_counts_match_closed_form(checkpoint, method, options):
    model = build_model(checkpoint, method, **options)
    groups = model.trainable_parameter_groups()
    assert groups["method"] == expected_method_params(method, options, model)
    assert groups["head"] == D * CLASSES + CLASSES
    assert groups["final_norm"] == 2 * D


@pytest.mark.parametrize(
    ("method", "options"), IDENTITY_AT_START, ids=[IDS[VARIANTS.index(v)] for v in IDENTITY_AT_START]
)
def test_fresh_modules_leave_the_backbone_output_unchanged(checkpoint, method, options):
    frozen = build_model(checkpoint, "linear").eval()
    adapted = build_model(checkpoint, method, **options).eval()
    wavs, lens = waveforms()
    with torch.no_grad():
        expected, _ = frozen.backbone(wavs, lens)
        actual, _ = adapted.backbone(wavs, lens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_every_trainable_tensor_learns_and_no_frozen_tensor_gets_a_gradient(checkpoint, method, options):
    # Zero-initialised up-projections (identity at start) block the gradient of what lies before them
    # on the very first step, so take one step, then check the second backward pass.
    model = build_model(checkpoint, method, **options).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    wavs, lens = waveforms()
    labels = torch.tensor([0, 1, 2])
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(wavs, lens), labels).backward()
        optimizer.step()
    dead = [name for name, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    leaking = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not dead
    assert not leaking


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_trainable_state_round_trips_exactly_into_a_fresh_model(checkpoint, method, options, tmp_path):
    model = build_model(checkpoint, method, seed=1, **options).train()
    with torch.no_grad():  # move every trainable tensor away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    wavs, lens = waveforms()
    model(wavs, lens)  # one training forward updates BatchNorm statistics of conformer blocks
    path = tmp_path / "trainable.pt"
    torch.save(model.trainable_state_dict(), path)

    fresh = build_model(checkpoint, method, seed=2, **options)
    fresh.load_trainable_state_dict(torch.load(path))
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(wavs, lens), model(wavs, lens), rtol=0, atol=0)

    stored = sum(t.numel() * t.element_size() for t in model.trainable_state_dict().values())
    assert stored <= path.stat().st_size <= stored + 4096 + 400 * len(model.trainable_state_dict())


def test_loading_a_state_of_another_method_names_the_mismatch(checkpoints):
    lora = build_model(checkpoints["ast"], "lora", reduction_rate=8)
    adapter = build_model(checkpoints["ast"], "adapter", reduction_rate=4)
    with pytest.raises(ValueError, match="trainable state does not match this model: .* missing"):
        adapter.load_trainable_state_dict(lora.trainable_state_dict())


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "o"]])
def test_lora_merged_and_unmerged_give_the_same_outputs(checkpoint, targets):
    model = build_model(checkpoint, "lora", reduction_rate=8, targets=targets).eval()
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora.lora_B.weight.normal_(std=0.2)
    wavs, lens = waveforms()
    weights = {name: p.clone() for name, p in model.named_parameters() if "base.weight" in name}
    with torch.no_grad():
        unmerged = model(wavs, lens)
        model.merge_lora()
        merged = model(wavs, lens)
        model.unmerge_lora()
        restored = model(wavs, lens)
    assert not torch.allclose(unmerged, build_model(checkpoint, "linear").eval()(wavs, lens))
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored, unmerged, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_frozen_backbone_behaves_as_at_inference_during_training(checkpoints, tmp_path, method, options):
    """Dropout and LayerDrop of the frozen backbone stay off in train mode; full fine-tuning keeps them."""
    from petl_modules.checkpoints import write_random_checkpoint

    noisy = write_random_checkpoint(
        "wav2vec2",
        tmp_path / "noisy_wav2vec2",
        hidden_dropout=0.5,
        attention_dropout=0.5,
        activation_dropout=0.5,
        layerdrop=0.5,
    )
    model = build_model(noisy, method, **options).train()
    assert model.training
    wavs, lens = waveforms()
    first, _ = model.backbone(wavs, lens)
    second, _ = model.backbone(wavs, lens)
    if method == "full_ft":
        assert not torch.equal(first, second)
    else:
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        assert not any(
            m.training for m in model.backbone.model.modules() if type(m).__module__.startswith("transformers")
        )


def test_moa_output_enters_the_residual_stream_exactly_once(checkpoints):
    """A mixture beside MHSA that outputs a constant c must change the layer as attention(x) + c does."""
    for method in ("dense_moa", "soft_moa"):
        model = build_model(checkpoints["ast"], method, num_adapters=2, reduction_rate=4).eval()
        layer = model.backbone.layers[0]
        constant = torch.randn(D) * 0.3
        layer.attention.module.forward = lambda x, mask=None, c=constant: c.expand_as(x)

        reference = copy.deepcopy(build_model(checkpoints["ast"], "linear").backbone.layers[0]).eval()
        original_attention = reference.attention.forward
        reference.attention.forward = lambda x, *a, f=original_attention, c=constant, **k: (f(x, *a, **k)[0] + c, None)

        tokens = torch.randn(2, 7, D)
        with torch.no_grad():
            torch.testing.assert_close(layer(tokens), reference(tokens), rtol=0, atol=1e-6)


def naive_soft_moa(mixture, x, mask):
    """Soft MoE written token by token and expert by expert, as in the paper's equations."""
    from petl_modules.methods.moa import BottleneckExperts

    batch, tokens, _ = x.shape
    experts, slots = mixture.num_experts, mixture.num_slots
    output = torch.zeros_like(x)
    for b in range(batch):
        real = range(tokens) if mask is None else [t for t in range(tokens) if mask[b, t]]
        xb = x[b]
        if mixture.normalize:
            phi = mixture.scale * mixture.phi / mixture.phi.norm(dim=0, keepdim=True)
            logits = (xb / xb.norm(dim=-1, keepdim=True)) @ phi
        else:
            logits = xb @ mixture.phi
        real_logits = logits[list(real)]
        dispatch = torch.exp(real_logits) / torch.exp(real_logits).sum(dim=0, keepdim=True)
        slot_inputs = dispatch.T @ xb[list(real)]  # (experts * slots, D)
        slot_outputs = torch.empty_like(slot_inputs)
        for e in range(experts):
            chunk = slot_inputs[e * slots : (e + 1) * slots]
            assert isinstance(mixture.experts, BottleneckExperts)
            hidden = torch.nn.functional.gelu(chunk @ mixture.experts.down_weight[e] + mixture.experts.down_bias[e])
            slot_outputs[e * slots : (e + 1) * slots] = (
                hidden @ mixture.experts.up_weight[e] + mixture.experts.up_bias[e]
            )
        combine = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
        output[b] = combine @ slot_outputs
    return output


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_slots", [1, 2])
def test_soft_moa_matches_the_paper_equations(checkpoints, normalize, num_slots):
    model = build_model(
        checkpoints["wav2vec2"], "soft_moa", num_adapters=3, num_slots=num_slots, normalize=normalize, reduction_rate=4
    )
    mixture = model.backbone.layers[0].attention.module
    with torch.no_grad():
        mixture.experts.up_weight.normal_(std=0.2)
        if normalize:
            mixture.scale.fill_(3.0)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        torch.testing.assert_close(mixture(x, mask), naive_soft_moa(mixture, x, mask), rtol=1e-4, atol=1e-5)
        # Padding never takes part in a slot: changing padded tokens changes no real token's output.
        changed = x.clone()
        changed[1, 4:] = torch.randn(2, D) * 10
        torch.testing.assert_close(mixture(changed, mask)[1, :4], mixture(x, mask)[1, :4], rtol=1e-5, atol=1e-6)
        if normalize:  # normalisation is over the feature axis: token norms do not matter
            scaled = x * torch.rand(2, 6, 1) * 5
            torch.testing.assert_close(mixture.logits(scaled), mixture.logits(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_padding_never_changes_an_utterance_output(checkpoints, method, options):
    """With a padding-invariant CNN, an utterance scores the same alone and padded inside a batch."""
    model = build_model(checkpoints["wav2vec2_stable"], method, **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        wavs, _ = waveforms(batch=2)
        short = wavs[1, :9600]
        alone = model(short[None], torch.ones(1))
        batched = model(torch.stack([wavs[0], torch.nn.functional.pad(short, (0, 6400))]), torch.tensor([1.0, 0.6]))
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)


def test_bad_options_are_named(checkpoints):
    with pytest.raises(ValueError, match="apply_residual must be True or False; got 'False'"):
        build_model(checkpoints["ast"], "adapter", apply_residual="False")
    with pytest.raises(ValueError, match="adapter_type must be one of Pfeiffer, Houlsby; got 'pfeifer'"):
        build_model(checkpoints["ast"], "adapter", adapter_type="pfeifer")
    with pytest.raises(ValueError, match="targets must be a non-empty list of q, k, v, o"):
        build_model(checkpoints["ast"], "lora", targets=["query"])
    with pytest.raises(ValueError, match="pooling 'cls' needs"):
        build_model(checkpoints["wav2vec2"], "linear", pooling="cls")


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_wav2vec2_cnn_feature_encoder_never_trains(checkpoints, method, options):
    model = build_model(checkpoints["wav2vec2"], method, **options)
    assert not any(p.requires_grad for p in model.backbone.model.feature_extractor.parameters())


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_follow_the_special_tokens_and_deep_prompts_replace_the_previous_ones(checkpoints, deep):
    model = build_model(checkpoints["ast"], "prompt_tuning", prompt_len=3, deep=deep).eval()
    seen = []
    for layer in model.backbone.layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].clone()), with_kwargs=True)
    wavs, _ = waveforms(batch=1)
    with torch.no_grad():
        tokens, _ = model.backbone(wavs)
    prompts = model.backbone.token_hooks[0].prompts
    assert tokens.shape[1] == 2 + 12 * 9 + 3  # [CLS], [DIST], patches, prompts
    torch.testing.assert_close(seen[0][0, 2:5], prompts[0])
    if deep:
        torch.testing.assert_close(seen[1][0, 2:5], prompts[1])
    else:
        assert not torch.allclose(seen[1][0, 2:5], prompts[0])
