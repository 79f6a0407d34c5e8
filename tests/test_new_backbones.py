"""Data2Vec-audio, WavLM and Whisper: the frozen forward against Hugging Face, every method block, summary, recipe,
export. (Whisper's front end, windows and exports: tests/test_whisper.py.)

Tiny random checkpoints (tiny_models.CHECKPOINTS): hidden 32, 2 layers, 4 heads, FFN 64. Data2Vec-audio has
Wav2Vec2's post-LN layers behind a stack of positional convolutions; WavLM passes a gated relative position
bias from layer to layer (post-LN with a GroupNorm CNN like wavlm-base-plus, pre-LN with a LayerNorm CNN like
wavlm-large). Whisper's encoder has pre-LN layers whose key projection has no bias.
"""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import recipe_args, run_recipes, write_workspace
from tiny_models import CHECKPOINTS, waveforms, write_checkpoints
from trained_runs import check_equals_test_stage, manifest_items
from transformers import Data2VecAudioModel, WavLMModel, WhisperModel

from petl_apps.summary import main as summary_main
from petl_modules import classify, export
from petl_modules.backbones import BackboneLoadError, build_backbone
from petl_modules.hparams_loader import LIBRARY_HPARAMS, load_hparams
from petl_modules.methods import METHOD_FILES, METHODS
from petl_modules.model import PETLModel
from petl_modules.random_backbones import backbone_config, write_random_checkpoint
from petl_modules.run_folder import InferenceError

WAVEFORM = ["data2vec", "wavlm", "wavlm_stable"]  # tiny_models.CHECKPOINTS names of the new waveform encoders
NEW = [*WAVEFORM, "whisper"]  # ... and of every new backbone
KINDS = sorted({kind for name, (kind, _) in CHECKPOINTS.items() if name in NEW})
HF_MODELS = {"data2vec": Data2VecAudioModel, "wavlm": WavLMModel, "whisper": WhisperModel}
D, LAYERS, FFN, HEADS, CLASSES = 32, 2, 64, 4, 5
# WavLM's attention adds, per layer, the gate of the position bias (gru_rel_pos_linear: head size -> 8, and
# gru_rel_pos_const: one per head) and, in layer 0 only, the relative attention embedding (320 buckets x heads).
WAVLM_GATE, WAVLM_GATE_BIAS, WAVLM_RELATIVE_EMBEDDING = (D // HEADS * 8 + 8) + HEADS, 8, 320 * HEADS

# Closed forms on D = 32, as tests/test_hparams_and_summary.py states them for Wav2Vec2. The method blocks'
# defaults give a bottleneck (rank) of max(1, 32 // rate) = 1; 7 experts, 1 slot; prefix 12, prompt 25.
B, EXPERTS = 1, 7
LAYER = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * 2 * D  # Q, K, V, O; FFN; two LayerNorms
WHISPER_K_BIAS = D  # what a Whisper layer lacks: its key projection has no bias
BOTTLENECK_ADAPTER = (D * B + B) + (B * D + D)
EXPERT_WEIGHTS = EXPERTS * BOTTLENECK_ADAPTER
CONFORMER_ADAPTER = 2 * D + (D * 2 * B + 2 * B) + (B * 31 + B) + 2 * B + (B * D + D)
ENCODER_BIASES = LAYERS * (4 * D + FFN + D + 2 * D)
METHOD_PARAMS = {
    "linear": 0,
    "full_ft": LAYERS * LAYER,  # the Wav2Vec2 family's default: the last 3 layers (here both)
    "bitfit": ENCODER_BIASES,  # plus the encoder LayerNorm's bias in front of post-LN layers
    "prompt_tuning": 25 * D,
    "prefix_tuning": LAYERS * 2 * 12 * D,
    "lora": LAYERS * 2 * (B * D + D * B),
    "adapter": LAYERS * BOTTLENECK_ADAPTER,
    "conformer_adapter": LAYERS * CONFORMER_ADAPTER,
    "dense_moa": LAYERS * ((D * EXPERTS + EXPERTS) + EXPERT_WEIGHTS),
    "soft_moa": LAYERS * (D * EXPERTS + EXPERT_WEIGHTS),
}
assert sorted(METHOD_PARAMS) == sorted(METHOD_FILES)
# Blocks whose fresh model computes what the frozen backbone computes (nothing added, or zero-initialised
# up-projections beside the sub-layers), as on AST and Wav2Vec2; prompts and prefixes change the output.
IDENTITY_AT_START = [m for m in METHOD_FILES if m not in ("prompt_tuning", "prefix_tuning")]
# Hugging Face's WavLM attention hands PyTorch a boolean padding mask beside its float position bias.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def kind_of(name: str) -> str:
    return CHECKPOINTS[name][0]


def yaml_model(checkpoints, name: str, method_file: str, seed: int = 0, **overrides) -> PETLModel:
    """The model of the method block `method_file` with the model block's defaults for this backbone."""
    torch.manual_seed(seed)
    settings = {"backbone": kind_of(name), "backbone_source": str(checkpoints[name]), "num_classes": CLASSES}
    settings["target_length"] = 100  # Whisper's clip window: 1 s (the waveform encoders take any length)
    path = LIBRARY_HPARAMS / "methods" / f"{method_file}.yaml"
    return load_hparams(path, {**settings, **overrides}, defaults=(LIBRARY_HPARAMS / "model.yaml",))["model"]


def normalised(wavs: torch.Tensor, lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the checkpoints' feature extractor (do_normalize) gives the model: each waveform zero-mean, unit
    variance over its own samples, zero-padded; and the sample mask (Hugging Face's `attention_mask`)."""
    samples = torch.full((len(wavs),), wavs.shape[1]) if lens is None else (lens * wavs.shape[1]).round().long()
    mask = torch.arange(wavs.shape[1])[None] < samples[:, None]
    out = torch.zeros_like(wavs)
    for index, count in enumerate(samples.tolist()):
        wav = wavs[index, :count]
        out[index, :count] = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
    return out, mask


def our_last_hidden_state(backbone, wavs, lens=None):
    tokens, mask = backbone(wavs, lens)
    return (backbone.final_norm(tokens) if backbone.final_norm is not None else tokens), mask


# --- the frozen forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WAVEFORM)
def test_frozen_forward_equals_the_hugging_face_model(checkpoints, name):
    backbone = build_backbone(kind_of(name), str(checkpoints[name])).eval()
    reference = HF_MODELS[kind_of(name)].from_pretrained(checkpoints[name]).eval()
    wavs, _ = waveforms(batch=2, seconds=0.5)
    with torch.no_grad():
        ours, mask = our_last_hidden_state(backbone, wavs)
        theirs = reference(normalised(wavs, None)[0]).last_hidden_state
    assert mask is None
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", WAVEFORM)
def test_padded_batch_equals_the_hugging_face_model_with_its_attention_mask(checkpoints, name):
    """Real frames equal Hugging Face's with its attention mask; a padding-invariant backbone's also equal
    each file's output alone, and a backbone that is not says so."""
    backbone = build_backbone(kind_of(name), str(checkpoints[name])).eval()
    reference = HF_MODELS[kind_of(name)].from_pretrained(checkpoints[name]).eval()
    wavs, lens = waveforms(batch=3, seconds=0.5)
    inputs, sample_mask = normalised(wavs, lens)
    with torch.no_grad():
        ours, mask = our_last_hidden_state(backbone, wavs, lens)
        theirs = reference(inputs, attention_mask=sample_mask.long()).last_hidden_state
        alone = [
            reference(inputs[i : i + 1, : int(sample_mask[i].sum())]).last_hidden_state[0] for i in range(len(wavs))
        ]
    assert mask.sum(1).tolist() == [len(item) for item in alone]
    torch.testing.assert_close(ours[mask], theirs[mask])
    differences = [(ours[i, : len(item)] - item).abs().max().item() for i, item in enumerate(alone)]
    if backbone.padding_invariant:
        assert max(differences) < 1e-4
    else:  # the full-length file is never padded; a padded one differs near its end
        assert differences[0] < 1e-4 and max(differences) > 1e-3


def test_data2vec_is_not_padding_invariant_and_wav2vec2_with_a_layer_norm_cnn_is(checkpoints):
    assert not build_backbone("data2vec", str(checkpoints["data2vec"])).padding_invariant
    assert build_backbone("wav2vec2", str(checkpoints["wav2vec2_stable"])).padding_invariant


# --- loading and random checkpoints ------------------------------------------------------------------------


def test_wrong_architecture_is_one_line(checkpoints):
    with pytest.raises(BackboneLoadError, match=r"model_type is 'wav2vec2', expected one of data2vec-audio$"):
        build_backbone("data2vec", str(checkpoints["wav2vec2"]))
    with pytest.raises(BackboneLoadError, match=r"model_type is 'data2vec-audio', expected one of wavlm$"):
        build_backbone("wavlm", str(checkpoints["data2vec"]))
    with pytest.raises(BackboneLoadError, match=r"model_type is 'wavlm', expected one of wav2vec2$"):
        build_backbone("wav2vec2", str(checkpoints["wavlm"]))
    with pytest.raises(BackboneLoadError, match=r"model_type is 'wavlm', expected one of whisper$"):
        build_backbone("whisper", str(checkpoints["wavlm"]))
    with pytest.raises(BackboneLoadError, match=r"model_type is 'whisper', expected one of wavlm$"):
        build_backbone("wavlm", str(checkpoints["whisper"]))


@pytest.mark.parametrize(
    ("kind", "hub_id"),
    [
        ("data2vec", "facebook/data2vec-audio-base"),
        ("wavlm", "microsoft/wavlm-base-plus"),
        ("whisper", "openai/whisper-base"),
    ],
)
def test_default_source_is_the_hub_checkpoint_and_offline_says_how_to_pass_a_folder(monkeypatch, kind, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        BackboneLoadError, match=f"^backbone_source '{hub_id}': not a local folder .*--backbone_source=DIR$"
    ):
        build_backbone(kind)


@pytest.mark.parametrize("kind", ["data2vec", "wavlm"])
def test_random_backbones_command_writes_a_tiny_folder_and_knows_the_base_config(kind, tmp_path, monkeypatch):
    import sys

    from petl_modules import random_backbones

    monkeypatch.setattr(sys, "argv", ["random_backbones", kind, str(tmp_path / kind), "--size", "tiny"])
    random_backbones.main()
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (D, LAYERS)
    assert build_backbone(kind, str(tmp_path / kind)).hidden_size == D
    base = backbone_config(kind, "base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)


# --- every method block -------------------------------------------------------------------------------------


def expected_groups(name: str, method_file: str, model: PETLModel) -> dict[str, int]:
    """Trainable counts in closed form. The Wav2Vec2 family's defaults keep every LayerNorm frozen, except
    what full fine-tuning (the last layers and the final norm of pre-LN layers) and BitFit (every bias of the
    encoder: the LayerNorm in front of post-LN layers, the final norm of pre-LN ones) train. Whisper takes the
    same defaults."""
    method, final_norm = METHOD_PARAMS[method_file], 0
    post_ln, wavlm, whisper = model.backbone.final_norm is None, kind_of(name) == "wavlm", kind_of(name) == "whisper"
    if method_file == "full_ft":
        method += wavlm * (LAYERS * WAVLM_GATE + WAVLM_RELATIVE_EMBEDDING) - whisper * LAYERS * WHISPER_K_BIAS
        final_norm = 0 if post_ln else 2 * D
    if method_file == "bitfit":
        method += wavlm * LAYERS * WAVLM_GATE_BIAS + (D if post_ln else 0) - whisper * LAYERS * WHISPER_K_BIAS
        final_norm = 0 if post_ln else D
    return {"method": method, "head": D * CLASSES + CLASSES, "final_norm": final_norm, "sublayer_norm": 0}


@pytest.mark.parametrize("method_file", METHOD_FILES)
@pytest.mark.parametrize("name", NEW)
def test_method_block_counts_its_parameters_in_closed_form(checkpoints, name, method_file):
    model = yaml_model(checkpoints, name, method_file)
    assert model.trainable_parameter_groups() == expected_groups(name, method_file, model)


@pytest.mark.parametrize("method_file", IDENTITY_AT_START)
@pytest.mark.parametrize("name", NEW)
def test_method_block_starts_as_the_frozen_backbone(checkpoints, name, method_file):
    frozen = yaml_model(checkpoints, name, "linear").eval()
    adapted = yaml_model(checkpoints, name, method_file).eval()
    wavs, lens = waveforms(batch=3, seconds=0.5)
    with torch.no_grad():
        torch.testing.assert_close(adapted.backbone(wavs, lens)[0], frozen.backbone(wavs, lens)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method_file", METHOD_FILES)
@pytest.mark.parametrize("name", NEW)
def test_method_block_trains_every_trainable_tensor_and_no_frozen_one(checkpoints, name, method_file):
    # Zero-initialised up-projections block the gradient of what lies before them on the first step: check the
    # second backward pass. The seed draws no LayerDrop for full fine-tuning.
    model = yaml_model(checkpoints, name, method_file).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    wavs, lens = waveforms(batch=3, seconds=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(wavs, lens), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    leaking = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not dead and not leaking


@pytest.mark.parametrize("name", NEW)
def test_structural_variants_build_and_train(checkpoints, name):
    """Options the method blocks' defaults leave out: deep prompts, Houlsby adapters, LoRA on all four
    projections, mixtures beside both sub-layers, full fine-tuning of every tensor."""
    variants = [
        ("prompt_tuning", {"prompt_len": 3, "deep": True}),
        ("adapter", {"reduction_rate": 4, "adapter_type": "Houlsby"}),
        ("lora", {"reduction_rate": 8, "targets": ["q", "k", "v", "o"]}),
        ("soft_moa", {"num_adapters": 2, "reduction_rate": 4, "location": "both"}),
        ("full_ft", {}),
    ]
    wavs, lens = waveforms(batch=3, seconds=0.5)
    for method, options in variants:
        torch.manual_seed(0)
        model = PETLModel(build_backbone(kind_of(name), str(checkpoints[name])), METHODS[method](**options), CLASSES)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(wavs, lens), torch.tensor([0, 1, 2])).backward()
            optimizer.step()
        dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
        leaking = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not dead and not leaking, method


@pytest.mark.parametrize("method_file", METHOD_FILES)
@pytest.mark.parametrize("name", NEW)
def test_summary_of_every_method_block(checkpoints, capsys, name, method_file):
    path = LIBRARY_HPARAMS / "methods" / f"{method_file}.yaml"
    argv = [str(path), f"--backbone={kind_of(name)}", f"--backbone_source={checkpoints[name]}", "--json"]
    assert summary_main([*argv, f"--num_classes={CLASSES}", "--target_length=100"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = HF_MODELS[kind_of(name)].from_pretrained(checkpoints[name])
    cut = 0
    if kind_of(name) == "whisper":  # the encoder alone, its 1500-row positional table cut to the clip's 50 tokens
        model, cut = model.encoder, (1500 - 50) * D
    expected = expected_groups(name, method_file, yaml_model(checkpoints, name, method_file))
    assert summary["backbone_params"] == sum(p.numel() for p in model.parameters()) - cut
    assert summary["method_params"] == expected["method"]
    assert summary["head_params"] == expected["head"]


# --- recipes, export and classify ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, checkpoints):
    """One-epoch GSC LoRA runs through the recipe's command line: one per new backbone kind with the workspace's
    checkpoint, and one on the padding-invariant WavLM (LayerNorm CNN), whose test stage a file alone repeats.
    Besides, ESC-50 linear probing on the workspace's WavLM (GroupNorm CNN) and Whisper with and without cached
    embeddings (clips of one length: the full run's batches hold no padding either)."""
    root = tmp_path_factory.mktemp("recipes")
    workspace = write_workspace(root)
    runs = {kind: ("GSC", recipe_args("GSC", "lora", workspace, root / kind, backbone=kind)) for kind in KINDS}
    stable = f"--backbone_source={checkpoints['wavlm_stable']}"
    runs["wavlm_stable"] = (
        "GSC",
        recipe_args("GSC", "lora", workspace, root / "wavlm_stable", stable, backbone="wavlm"),
    )
    for kind in ("wavlm", "whisper"):
        for cached in (True, False):
            options = ("--number_of_epochs=2", "--lr=0.05", "--batch_size=2", f"--cache_embeddings={cached}")
            if kind == "whisper":  # ESC-50's SpecAugment acts on Whisper's log-mel: the cache needs it off
                options += ("--spec_augment=False",)
            name = f"linear_{'cached' if cached else 'full'}_{kind}"
            runs[name] = ("ESC50", recipe_args("ESC50", "linear", workspace, root / name, *options, backbone=kind))
    outcomes = run_recipes(list(runs.values()), root / "report.json")
    for name, outcome in zip(runs, outcomes):
        assert outcome["code"] == 0, f"{name}: {outcome['message']}"
    return {name: root / name for name in runs}


@pytest.mark.parametrize("kind", ["wavlm", "whisper"])
def test_linear_probe_from_cached_embeddings_equals_the_full_run(lora_runs, kind):
    """WavLM's GroupNorm CNN is not padding-invariant: the cache runs the backbone on batches of equal length;
    Whisper's features are padded file by file: the cache runs zero-padded batches."""
    cached, full = (
        json.loads((lora_runs[f"{name}_{kind}"] / "results.json").read_text())
        for name in ("linear_cached", "linear_full")
    )
    ((cached_fold,), (full_fold,)) = (cached["folds"].values(), full["folds"].values())
    for split in ("valid", "test"):
        for key, value in full_fold[split].items():
            expected = value if key == "confusion_matrix" else pytest.approx(value, rel=1e-4, abs=1e-5)
            assert cached_fold[split][key] == expected, (split, key)
    logs = "".join(path.read_text() for path in lora_runs[f"linear_cached_{kind}"].rglob("log.txt"))
    assert "Linear probing from cached embeddings" in logs


@pytest.mark.parametrize("name", [*KINDS, "wavlm_stable"])
def test_recipe_export_and_classify(lora_runs, name, tmp_path):
    run = lora_runs[name]
    kind = kind_of(name)
    results = json.loads((run / "results.json").read_text())
    assert results["backbone"] == kind and results["method"] == "lora"
    info = export.main(["--run", str(run), "--out", str(tmp_path / "export")])
    assert info["backbone"]["kind"] == kind
    assert info["input"]["input"] == ("log_mel" if kind == "whisper" else "waveform")
    files = [path for path, _ in manifest_items(run)]
    exported = classify.classify(str(tmp_path / "export"), files, top_k=4, device="cpu")
    assert exported == classify.classify(str(run), files, top_k=4, device="cpu")
    if build_backbone(kind, info["backbone"]["source"]).padding_invariant:
        check_equals_test_stage(exported, run)  # each file alone scores as in the padded test batches
    else:
        assert name != "wavlm_stable"


def test_wavlm_lora_exports_merged_and_refuses_the_peft_format(lora_runs, tmp_path):
    """PEFT's LoRA would not act on Hugging Face's WavLM; the merged folder is a plain WavLMModel that does."""
    run = lora_runs["wavlm_stable"]
    with pytest.raises(InferenceError, match=r"^--format peft: PEFT's LoRA does not act on WavLMModel .*--merge"):
        export.export(run, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
    export.export(run, tmp_path / "merged", merge=True)
    files = [path for path, _ in manifest_items(run)]
    merged = classify.classify(str(tmp_path / "merged"), files, top_k=4, device="cpu")
    unmerged = classify.classify(str(run), files, top_k=4, device="cpu")
    scores = [[entry["score"] for entry in record["top_k"]] for record in merged]
    assert [r["label"] for r in merged] == [r["label"] for r in unmerged]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor([[e["score"] for e in r["top_k"]] for r in unmerged]))


# --- WavLM's relative position bias through the methods ------------------------------------------------------


def swapped_hf_model(folder):
    from petl_modules.backbones.wavlm import WavLMModuleAttention

    model = WavLMModel.from_pretrained(folder).eval()
    for module in model.modules():
        if type(module).__name__ == "WavLMAttention":
            module.__class__ = WavLMModuleAttention
    return model


@pytest.mark.parametrize("name", ["wavlm", "wavlm_stable"])
def test_wavlm_attention_from_the_projection_modules_equals_hugging_face(checkpoints, name):
    """The subclass the backbone sets on WavLM's attention modules changes no value of Hugging Face's forward."""
    wavs, lens = waveforms(batch=3, seconds=0.5)
    inputs, sample_mask = normalised(wavs, lens)
    reference = WavLMModel.from_pretrained(checkpoints[name]).eval()
    with torch.no_grad():
        theirs = reference(inputs, attention_mask=sample_mask.long())
        ours = swapped_hf_model(checkpoints[name])(inputs, attention_mask=sample_mask.long())
    real = reference._get_feature_vector_attention_mask(theirs.last_hidden_state.shape[1], sample_mask.long())
    torch.testing.assert_close(ours.last_hidden_state[real], theirs.last_hidden_state[real])


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "o"]])
def test_lora_acts_on_wavlm_and_its_merged_weights_run_in_hugging_face(checkpoints, targets, tmp_path):
    model = PETLModel(
        build_backbone("wavlm", str(checkpoints["wavlm_stable"])),
        METHODS["lora"](reduction_rate=8, targets=targets),
        CLASSES,
    ).eval()
    frozen = PETLModel(build_backbone("wavlm", str(checkpoints["wavlm_stable"])), METHODS["linear"](), CLASSES)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora.lora_B.weight.normal_(std=0.2)
    wavs, _ = waveforms(batch=1, seconds=0.5)
    with torch.no_grad():
        ours, _ = our_last_hidden_state(model.backbone, wavs)
        assert not torch.allclose(ours, our_last_hidden_state(frozen.eval().backbone, wavs)[0], atol=1e-3)
        export.write_merged_backbone(model, tmp_path / "merged")
        merged = WavLMModel.from_pretrained(tmp_path / "merged").eval()(normalised(wavs, None)[0])
    torch.testing.assert_close(merged.last_hidden_state, ours, rtol=1e-4, atol=1e-5)


def test_prefix_attention_on_wavlm_adds_the_gated_position_bias_to_the_layer_keys_only(checkpoints):
    """softmax([q k_p / sqrt(d), q k / sqrt(d) + Hugging Face's gated bias]) over [prefix, real] keys, -inf on
    padded keys, then [v_p, v] and the output projection. As on AST, fresh prefixes are not the identity:
    random keys and values take part of the attention from the first step."""
    model = PETLModel(build_backbone("wavlm", str(checkpoints["wavlm"])), METHODS["prefix_tuning"](prefix_len=3), 5)
    backbone = model.backbone.eval()
    prefix_attention = backbone.layers[1].attention
    reference = WavLMModel.from_pretrained(checkpoints["wavlm"]).eval()
    captured = {}
    attention = reference.encoder.layers[1].attention
    original = attention.torch_multi_head_self_attention

    def capture(hidden_states, attention_mask, gated_position_bias):
        captured["bias"] = gated_position_bias
        return original(hidden_states, attention_mask, gated_position_bias)

    attention.torch_multi_head_self_attention = capture
    batch, length, heads, size = 2, 7, HEADS, D // HEADS
    hidden = torch.randn(batch, length, D)
    mask = torch.tensor([[True] * length, [True] * 5 + [False] * 2])
    with torch.no_grad():
        position_bias = reference.encoder.layers[0].attention.compute_bias(length, length)
        attention(hidden, mask, position_bias.repeat(batch, 1, 1))
        backbone.state.padding_mask, backbone.state.position_bias = mask, position_bias
        output, weights, passed_on = prefix_attention(hidden, attention_mask=mask, position_bias=position_bias)
        frozen = prefix_attention.attention
        prefix = prefix_attention.prefix

        def split(x):
            return x.view(batch, -1, heads, size).transpose(1, 2)

        query, keys = split(frozen.q_proj(hidden)), split(frozen.k_proj(hidden))
        prefix_keys = split(prefix.keys.expand(batch, -1, -1))
        scale = size**-0.5
        logits = torch.cat(
            [
                (query @ prefix_keys.transpose(-1, -2)) * scale,
                (query @ keys.transpose(-1, -2)) * scale + captured["bias"].view(batch, heads, length, length),
            ],
            dim=-1,
        )
        logits[1, :, :, 3 + 5 :] = float("-inf")
        values = torch.cat([split(prefix.values.expand(batch, -1, -1)), split(frozen.v_proj(hidden))], dim=2)
        expected = frozen.out_proj((logits.softmax(-1) @ values).transpose(1, 2).reshape(batch, length, D))
    assert weights is None and passed_on is position_bias
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_on_wavlm_get_the_position_bias_of_the_longer_sequence(checkpoints, deep):
    """Prompts enter before layer 0 (deep ones replace the previous prompts: the length stays); every layer gets
    the bias of the prompted length, as Hugging Face's layer 0 computes it for the sequence it is given."""
    model = PETLModel(
        build_backbone("wavlm", str(checkpoints["wavlm"])), METHODS["prompt_tuning"](prompt_len=3, deep=deep), CLASSES
    ).eval()
    backbone = model.backbone
    seen = []
    for layer in backbone.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0], kwargs)), with_kwargs=True)
    wavs, lens = waveforms(batch=2, seconds=0.5)
    with torch.no_grad():
        tokens, mask = backbone(wavs, lens)
        given = list(seen)  # what our loop gave the layers (the loop below runs them again)
        embedded, frame_mask = backbone.embed(wavs, lens)
        # Hugging Face's layer loop on the same prompted tokens: layer 0 computes the bias, the rest receive it.
        hidden, bias = embedded, None
        prompts = backbone.token_hooks[0].prompts
        for index, layer in enumerate(backbone.layers):
            if index == 0 or deep:
                rest = hidden if index == 0 else hidden[:, 3:]
                hidden = torch.cat([prompts[index if deep else 0].expand(2, -1, -1), rest], dim=1)
            hidden, bias = layer(hidden, attention_mask=mask, position_bias=bias)
    length = embedded.shape[1] + 3
    assert [args.shape[1] for args, _ in given] == [length] * LAYERS
    assert all(kwargs["position_bias"].shape == (HEADS, length, length) for _, kwargs in given)
    torch.testing.assert_close(tokens[mask], hidden[mask])
    assert mask[:, :3].all() and torch.equal(mask[:, 3:], frame_mask)


WAVLM_CHECKPOINTING = [
    ("full_ft", {}),
    ("prompt_tuning", {"prompt_len": 3, "deep": True, "dropout": 0.2}),
    ("prefix_tuning", {"prefix_len": 2}),
    ("lora", {"reduction_rate": 8, "dropout": 0.2}),
]


@pytest.mark.parametrize(("method", "options"), WAVLM_CHECKPOINTING, ids=[m for m, _ in WAVLM_CHECKPOINTING])
def test_wavlm_checkpointed_layers_give_the_same_outputs_and_gradients(checkpoints, method, options):
    """The bias is computed outside the recomputed layers and handed to each: recomputation reads the same."""
    from test_activation_checkpointing import count_layer_calls, forward_backward

    models = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = build_backbone("wavlm", str(checkpoints["wavlm"]), activation_checkpointing=checkpointing)
        models.append(PETLModel(backbone, METHODS[method](**options), CLASSES).train())
    calls = [count_layer_calls(model) for model in models]
    wavs, lens = waveforms(batch=3, seconds=0.5)
    (logits, grads), (logits_ckpt, grads_ckpt) = (forward_backward(model, wavs, lens) for model in models)
    assert calls[1] == [2 * calls[0][0]]
    torch.testing.assert_close(logits_ckpt, logits)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for key, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5, msg=f"{key} differs")


def test_wavlm_layerdrop_never_drops_layer_0(tmp_path):
    """As Hugging Face's WavLM encoder, whose layer 0 computes the bias: LayerDrop skips later layers only."""
    quiet = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
    folder = write_random_checkpoint("wavlm", tmp_path / "wavlm", layerdrop=1.0, mask_time_prob=0.0, **quiet)
    backbone = build_backbone("wavlm", str(folder)).train()
    calls = []
    for index, layer in enumerate(backbone.layers):
        layer.register_forward_hook(lambda *args, index=index: calls.append(index))
    with torch.no_grad():
        backbone(*waveforms(batch=2, seconds=0.5))
    assert calls == [0]
