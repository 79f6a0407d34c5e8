"""The tuning methods' contract, on tiny AST and Wav2Vec2 backbones."""

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
    ("adapter", {"reduction_rate": 4, "adapter_block": "conformer", "kernel_size": 8}),  # even: the paper's k
    ("adapter", {"reduction_rate": 4, "location": "MHSA"}),  # Pfeiffer beside MHSA: the MLSP paper's text
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
    ("soft_moa", {"num_adapters": 2, "reduction_rate": 4, "adapter_block": "conformer", "kernel_size": 2}),
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


def adapted_sublayers(method: str, options: dict) -> int:
    """Sub-layers per layer that an adapter or a mixture sits beside (whose LayerNorm trains with it)."""
    if method == "adapter":
        return 2 if options.get("adapter_type") == "Houlsby" else 1
    if method in ("dense_moa", "soft_moa"):
        return 2 if options.get("location") == "both" else 1
    return 0


@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=IDS)
def test_trainable_counts_match_closed_form(checkpoint, method, options):
    model = build_model(checkpoint, method, **options)
    groups = model.trainable_parameter_groups()
    assert groups["method"] == expected_method_params(method, options, model)
    assert groups["head"] == D * CLASSES + CLASSES
    # The final norm trains (bias only with BitFit); post-LN Wav2Vec2 has none and the head adds none.
    has_final_norm = model.backbone.final_norm is not None
    assert groups["final_norm"] == (D if method == "bitfit" else 2 * D) * has_final_norm
    assert groups["sublayer_norm"] == LAYERS * adapted_sublayers(method, options) * 2 * D


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
    torch.manual_seed(0)  # full fine-tuning runs Wav2Vec2's LayerDrop: a seed where no layer is dropped
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
    from petl_modules.random_backbones import write_random_checkpoint

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


@pytest.mark.parametrize("keep_dist_token", [False, True])
@pytest.mark.parametrize("deep", [False, True])
def test_prompts_follow_the_special_tokens_and_deep_prompts_replace_the_previous_ones(
    checkpoints, deep, keep_dist_token
):
    """AST's first layer sees [CLS], prompts, patches (the reference drops [DIST]); or [CLS], [DIST], prompts, ..."""
    model = build_model(
        checkpoints["ast"], "prompt_tuning", prompt_len=3, deep=deep, keep_dist_token=keep_dist_token
    ).eval()
    seen = []
    for layer in model.backbone.layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].clone()), with_kwargs=True)
    wavs, _ = waveforms(batch=1)
    with torch.no_grad():
        tokens, _ = model.backbone(wavs)
        embedded, _ = model.backbone.embed(wavs, None)  # [CLS], [DIST], 12 x 9 patches
    prompts = model.backbone.token_hooks[0].prompts
    special = 2 if keep_dist_token else 1
    assert seen[0].shape[1] == tokens.shape[1] == special + 3 + 12 * 9
    torch.testing.assert_close(seen[0][0, :special], embedded[0, :special], rtol=0, atol=0)
    torch.testing.assert_close(seen[0][0, special : special + 3], prompts[0])
    torch.testing.assert_close(seen[0][0, special + 3 :], embedded[0, 2:], rtol=0, atol=0)
    if deep:
        torch.testing.assert_close(seen[1][0, special : special + 3], prompts[1])
    else:
        assert not torch.allclose(seen[1][0, special : special + 3], prompts[0])


def test_cls_dist_pooling_needs_the_dist_token_that_prompts_replace(checkpoints):
    with pytest.raises(ValueError, match="pooling 'cls_dist' needs .* loses to prompt_tuning"):
        build_model(checkpoints["ast"], "prompt_tuning", prompt_len=3, pooling="cls_dist")
    build_model(checkpoints["ast"], "prompt_tuning", prompt_len=3, pooling="cls_dist", keep_dist_token=True)


# --- The reference implementation's behaviour by default ------------------------------------


@pytest.mark.parametrize(
    ("scaling", "reduction_rate"), [("reference", 64), ("reference", 8), ("peft", 64), ("peft", 8)]
)
def test_lora_update_equals_peft_with_the_reference_scale(checkpoints, scaling, reduction_rate):
    """Our LoRA on AST equals PEFT's LoRA on the same ASTModel weights with the same A and B.

    The reference scales by alpha / reduction_rate: PEFT's alpha / rank with lora_alpha = alpha * rank / rate.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import ASTModel

    alpha = 8
    model = build_model(checkpoints["ast"], "lora", reduction_rate=reduction_rate, alpha=alpha, scaling=scaling)
    rank = max(1, D // reduction_rate)
    lora_alpha = alpha * rank / reduction_rate if scaling == "reference" else alpha
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(ASTModel.from_pretrained(str(checkpoints["ast"])), config).eval()
    peft_layers = peft_model.base_model.model.layers
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone.layers, peft_layers):
            for name in ("q_proj", "v_proj"):
                update = getattr(ours.attention, name).lora
                update.lora_B.weight.copy_(torch.randn(update.lora_B.weight.shape, generator=generator))
                peft_linear = getattr(theirs.attention, name)
                peft_linear.lora_A["default"].weight.copy_(update.lora_A.weight)
                peft_linear.lora_B["default"].weight.copy_(update.lora_B.weight)
        tokens = torch.randn(2, 7, D, generator=generator)
        ours_out, theirs_out = tokens, tokens
        for ours, theirs in zip(model.backbone.layers, peft_layers):
            ours_out, theirs_out = ours.eval()(ours_out), theirs(theirs_out)
        frozen = tokens
        for layer in build_model(checkpoints["ast"], "linear").backbone.layers:
            frozen = layer.eval()(frozen)
    assert update.scale == pytest.approx(alpha / (reduction_rate if scaling == "reference" else rank))
    assert not torch.allclose(ours_out, frozen, atol=1e-3)  # the update is not negligible
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)


SUBLAYER_NORMS = [  # (method, options, the AST LayerNorms the reference trains beside it)
    ("adapter", {"reduction_rate": 4}, {"layernorm_after"}),
    ("adapter", {"reduction_rate": 4, "adapter_type": "Houlsby"}, {"layernorm_before", "layernorm_after"}),
    ("adapter", {"reduction_rate": 4, "seq_or_par": "sequential", "apply_residual": True}, {"layernorm_after"}),
    ("adapter", {"reduction_rate": 4, "location": "MHSA"}, {"layernorm_before"}),
    ("dense_moa", {"num_adapters": 2, "reduction_rate": 4}, {"layernorm_before"}),
    ("soft_moa", {"num_adapters": 2, "reduction_rate": 4}, {"layernorm_before"}),
    ("soft_moa", {"num_adapters": 2, "reduction_rate": 4, "location": "FFN"}, {"layernorm_after"}),
    (
        "dense_moa",
        {"num_adapters": 2, "reduction_rate": 4, "location": "both"},
        {"layernorm_before", "layernorm_after"},
    ),
    ("lora", {"reduction_rate": 8}, set()),
    ("prompt_tuning", {"prompt_len": 2}, set()),
    ("linear", {}, set()),
]


@pytest.mark.parametrize("train_sublayer_norms", [True, False])
@pytest.mark.parametrize(("method", "options", "norms"), SUBLAYER_NORMS, ids=[f"{m}-{o}" for m, o, _ in SUBLAYER_NORMS])
def test_sublayer_norms_train_exactly_where_the_reference_trains_them(
    checkpoints, method, options, norms, train_sublayer_norms
):
    from petl_modules.backbones import build_backbone
    from petl_modules.methods import METHODS
    from petl_modules.model import PETLModel

    backbone = build_backbone("ast", str(checkpoints["ast"]), target_length=100)
    model = PETLModel(backbone, METHODS[method](**options), CLASSES, train_sublayer_norms=train_sublayer_norms)
    trained = {name for name, p in model.named_parameters() if p.requires_grad and ".layernorm_" in name}
    expected = {
        f"backbone.model.layers.{i}.{norm}.{tensor}"
        for i in range(LAYERS)
        for norm in (norms if train_sublayer_norms else ())
        for tensor in ("weight", "bias")
    }
    assert trained == expected
    assert model.trainable_parameter_groups()["sublayer_norm"] == len(expected) * D


@pytest.mark.parametrize("train_final_norm_weight", [False, True])
def test_bitfit_final_norm_trains_its_bias_only(checkpoints, train_final_norm_weight):
    model = build_model(checkpoints["ast"], "bitfit", train_final_norm_weight=train_final_norm_weight)
    final_norm = model.backbone.model.layernorm
    assert final_norm.bias.requires_grad
    assert final_norm.weight.requires_grad is train_final_norm_weight
    # Every other LayerNorm and Linear trains its bias and never its weight.
    for name, module in model.backbone.model.layers.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert module.bias.requires_grad and not module.weight.requires_grad, name


def load_recipe(dataset: str, method: str, tmp_path, **overrides) -> dict:
    from petl_modules.hparams_loader import load_hparams

    path = f"recipes/{dataset}/hparams/{method}.yaml"
    folders = {"data_folder": str(tmp_path / "data"), "output_folder": str(tmp_path / "out")}
    return load_hparams(path, {**folders, **overrides})


@pytest.mark.parametrize("dataset", ["FSC", "GSC"])
def test_fsc_and_gsc_train_50_epochs_with_wav2vec2_and_75_with_ast(checkpoints, tmp_path, monkeypatch, dataset):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ast, wav2vec2 = str(checkpoints["ast"]), str(checkpoints["wav2vec2"])
    assert load_recipe(dataset, "linear", tmp_path, backbone_source=ast)["number_of_epochs"] == 75
    hparams = load_recipe(dataset, "linear", tmp_path, backbone="wav2vec2", backbone_source=wav2vec2)
    assert hparams["number_of_epochs"] == 50 and hparams["epoch_counter"].limit == 50
    options = {"backbone": "wav2vec2", "backbone_source": wav2vec2, "number_of_epochs": 3}
    assert load_recipe(dataset, "linear", tmp_path, **options)["epoch_counter"].limit == 3


@pytest.mark.parametrize("method", ["linear", "conformer_adapter", "soft_moa", "bitfit", "full_ft"])
def test_wav2vec2_defaults_are_the_reference_ones(tmp_path, monkeypatch, method):
    """One Linear on the mean-pooled last layer, no LayerNorm trained (finetune_LN=False), full FT = last 3 layers."""
    from pathlib import Path

    from petl_modules.random_backbones import write_random_checkpoint

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    source = write_random_checkpoint("wav2vec2", tmp_path / "w2v", num_hidden_layers=4)
    model = load_recipe("FSC", method, tmp_path, backbone="wav2vec2", backbone_source=str(source))["model"]
    assert model.head.norm is None and model.head.pooling == "mean"
    assert [name for name, _ in model.head.named_parameters()] == ["linear.weight", "linear.bias"]
    layers = model.backbone.model.encoder.layers
    if method == "full_ft":
        assert model.method.num_trainable_layers == 3 and model.method.trains_backbone
        assert not any(p.requires_grad for p in layers[0].parameters())
        assert all(p.requires_grad for layer in layers[1:] for p in layer.parameters())
    else:
        norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
        norms -= model._method_parameter_ids()  # the conformer block's own LayerNorm is the method's
        trained_norms = [name for name, p in model.named_parameters() if p.requires_grad and id(p) in norms]
        # BitFit trains every bias (LayerNorm biases included, as in the reference), never a norm's weight.
        assert all(n.endswith(".bias") for n in trained_norms) if method == "bitfit" else not trained_norms


@pytest.mark.parametrize("kernel_size", [1, 2, 8, 31])
def test_conformer_depthwise_convolution_is_same_padding_for_any_kernel(checkpoints, kernel_size):
    """The block equals its steps written out with PyTorch's own `Conv1d(padding='same')` (for even k: one more
    zero on the right), on AST tokens and on a padded batch whose padded tokens are zeroed first."""
    from petl_modules.methods.blocks import ConformerBlock

    torch.manual_seed(0)
    block = ConformerBlock(D, 4, kernel_size).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=0.3)
        block.batch_norm.running_mean.normal_()
        block.batch_norm.running_var.uniform_(0.5, 2.0)
    reference_conv = torch.nn.Conv1d(4, 4, kernel_size, padding="same", groups=4)
    reference_conv.load_state_dict(block.depthwise.state_dict())

    def by_hand(x, mask):
        normed = torch.nn.functional.layer_norm(x, (D,), block.norm.weight, block.norm.bias)
        h = torch.nn.functional.glu(block.pointwise_in(normed))
        h = h if mask is None else h * mask[..., None]
        h = block.batch_norm(reference_conv(h.transpose(1, 2)))
        return block.pointwise_out(torch.nn.functional.silu(h).transpose(1, 2))

    tokens = build_model(checkpoints["ast"]).backbone.embed(*waveforms(batch=2))[0].detach()
    x = torch.randn(2, 7, D)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(block(tokens), by_hand(tokens, None))
        torch.testing.assert_close(block(x, mask), by_hand(x, mask))
        torch.testing.assert_close(block(x, mask)[1, :4], block(x[1:, :4])[0])  # alone, unpadded


def test_pfeiffer_adapter_sits_beside_the_sub_layer_its_location_names(checkpoints):
    from petl_modules.methods.adapter import AdaptedSublayer

    for location, adapted, plain in (("FFN", "mlp", "attention"), ("MHSA", "attention", "mlp")):
        layer = build_model(checkpoints["ast"], "adapter", reduction_rate=4, location=location).backbone.layers[0]
        assert isinstance(getattr(layer, adapted), AdaptedSublayer)
        assert not isinstance(getattr(layer, plain), AdaptedSublayer)
    with pytest.raises(ValueError, match="^adapter_location MHSA applies to Pfeiffer adapters; Houlsby ones sit"):
        build_model(checkpoints["ast"], "adapter", adapter_type="Houlsby", location="MHSA")
    with pytest.raises(ValueError, match="^adapter_location must be one of FFN, MHSA; got 'both'"):
        build_model(checkpoints["ast"], "adapter", location="both")
    with pytest.raises(ValueError, match="^kernel_size must be a positive integer; got 0"):
        build_model(checkpoints["ast"], "adapter", adapter_block="conformer", kernel_size=0)
