"""HyperPyYAML composition, command-line overrides and the parameter summary tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import write_checkpoints

from petl_apps.summary import main as summary_main
from petl_modules.hparams_loader import LIBRARY_HPARAMS, HparamsError, load_hparams

METHOD_FILES = sorted((LIBRARY_HPARAMS / "methods").glob("*.yaml"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def test_there_is_one_block_per_method():
    assert [path.stem for path in METHOD_FILES] == [
        "adapter",
        "bitfit",
        "conformer_adapter",
        "dense_moa",
        "full_ft",
        "linear",
        "lora",
        "prefix_tuning",
        "prompt_tuning",
        "soft_moa",
    ]


def test_extends_merges_blocks_and_overrides_reach_every_block(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\nb: 2\nboth: !ref <a>\n")
    (tmp_path / "run.yaml").write_text("extends: [base.yaml]\nb: 3\nc: !ref <b>\n")
    hparams = load_hparams(tmp_path / "run.yaml", "a: 5")
    assert hparams == {"a": 5, "b": 3, "both": 5, "c": 3}


def test_unknown_override_is_named(tmp_path):
    (tmp_path / "run.yaml").write_text("a: 1\n")
    with pytest.raises(HparamsError, match=r"unknown option --lrr: not a key of .*run.yaml"):
        load_hparams(tmp_path / "run.yaml", {"lrr": 0.1})


def test_missing_and_looping_files_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(HparamsError, match="'extends' loops back"):
        load_hparams(tmp_path / "a.yaml")
    with pytest.raises(HparamsError, match="hyperparameter file not found: .*nothing.yaml"):
        load_hparams(tmp_path / "nothing.yaml")


def test_command_line_false_is_false(checkpoints):
    """The reference read the string "False" as true; YAML overrides give real booleans."""
    hparams = load_hparams(
        LIBRARY_HPARAMS / "methods" / "adapter.yaml", "apply_residual: False\nseq_or_par: sequential"
    )
    assert hparams["method"].apply_residual is False
    hparams = load_hparams(LIBRARY_HPARAMS / "methods" / "adapter.yaml", "apply_residual: True")
    assert hparams["method"].apply_residual is True


def test_conformer_adapter_block_extends_the_adapter_block():
    hparams = load_hparams(LIBRARY_HPARAMS / "methods" / "conformer_adapter.yaml")
    assert hparams["method"].adapter_block == "conformer"
    assert (hparams["reduction_rate"], hparams["adapter_type"], hparams["seq_or_par"]) == (96, "Pfeiffer", "parallel")
    assert hparams["lr"] == 0.005


# Parameter counts of the tiny checkpoints (tiny_models), in closed form from their configs: hidden D, FFN
# width, layers; the summary's default class count; AST's tokens at 100 frames (12 x 9 patches, [CLS], [DIST]).
D, FFN, LAYERS, CLASSES, TOKENS = 32, 64, 2, 10, 12 * 9 + 2
LAYER = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * 2 * D  # Q, K, V, O; FFN; two LayerNorms: 8544
BACKBONE = {  # 28960 and 31024
    # layers, 16 x 16 patch convolution, positions resized to 100 frames, [CLS] and [DIST], final LayerNorm
    "ast": LAYERS * LAYER + (16 * 16 * D + D) + TOKENS * D + 2 * D + 2 * D,
    # layers, encoder LayerNorm, positional convolution (kernel 16, 4 groups, weight norm g and v, bias), CNN
    # (kernels 10 and 8, no biases, GroupNorm on the first), feature projection (LayerNorm, Linear), mask vector
    "wav2vec2": LAYERS * LAYER
    + 2 * D
    + (D * (D // 4) * 16 + 16 + D)
    + (D * 10 + 2 * D + D * D * 8)
    + (2 * D + D * D + D)
    + D,
}
# The method blocks' defaults on D = 32: adapter rate 96, MoA rate 128 and LoRA rate 64 all give a bottleneck
# (rank) of max(1, 32 // rate) = 1; 7 experts, 1 slot; prefix 12, prompt 25; LoRA on q and v.
B, EXPERTS = 1, 7
BOTTLENECK_ADAPTER = (D * B + B) + (B * D + D)  # down, up: 97
EXPERT_WEIGHTS = EXPERTS * BOTTLENECK_ADAPTER  # stacked down/up weights and biases: 679
# LayerNorm, pointwise in (GLU: 2 x bottleneck), depthwise kernel 31, BatchNorm, pointwise out: 228
CONFORMER_ADAPTER = 2 * D + (D * 2 * B + 2 * B) + (B * 31 + B) + 2 * B + (B * D + D)
ENCODER_BIASES = LAYERS * (4 * D + FFN + D + 2 * D)  # Q, K, V, O, the FFN's two Linears, two LayerNorms: 576
# Method parameters: one count, or one per backbone where they differ.
METHOD_PARAMS = {
    "adapter": LAYERS * BOTTLENECK_ADAPTER,  # Pfeiffer: one per layer
    "bitfit": {"ast": ENCODER_BIASES, "wav2vec2": ENCODER_BIASES + D},  # Wav2Vec2's encoder holds its LayerNorm
    "conformer_adapter": LAYERS * CONFORMER_ADAPTER,
    "dense_moa": LAYERS * ((D * EXPERTS + EXPERTS) + EXPERT_WEIGHTS),  # router + experts, beside MHSA
    # AST: the whole backbone but its final LayerNorm (counted apart); Wav2Vec2: the last 3 layers (here both)
    "full_ft": {"ast": BACKBONE["ast"] - 2 * D, "wav2vec2": LAYERS * LAYER},
    "linear": 0,
    "lora": LAYERS * 2 * (B * D + D * B),  # A and B of q and v
    "prefix_tuning": LAYERS * 2 * 12 * D,  # keys and values
    "prompt_tuning": 25 * D,  # shallow
    "soft_moa": LAYERS * (D * EXPERTS + EXPERT_WEIGHTS),  # Phi + experts, beside MHSA
}
ADAPTED_SUBLAYER_NORMS = {"adapter": LAYERS * 2 * D, "conformer_adapter": LAYERS * 2 * D}  # layernorm_after
ADAPTED_SUBLAYER_NORMS |= {"dense_moa": LAYERS * 2 * D, "soft_moa": LAYERS * 2 * D}  # layernorm_before


@pytest.mark.parametrize("backbone", ["ast", "wav2vec2"])
@pytest.mark.parametrize("method_file", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_summary_json_for_every_method_file_on_both_backbones(checkpoints, capsys, method_file, backbone):
    source = checkpoints["ast" if backbone == "ast" else "wav2vec2"]
    code = summary_main(
        [str(method_file), f"--backbone={backbone}", f"--backbone_source={source}", "--target_length=100", "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == method_file.stem
    # Counted from the configs, not from a model: AST trains its final LayerNorm (BitFit its bias only) and the
    # LayerNorm of each adapted sub-layer; Wav2Vec2 keeps its norms frozen (model.yaml).
    counts = METHOD_PARAMS[method_file.stem]
    method = counts if isinstance(counts, int) else counts[backbone]
    on_ast = backbone == "ast"
    final_norm = (D if method_file.stem == "bitfit" else 2 * D) if on_ast else 0
    sublayer_norms = ADAPTED_SUBLAYER_NORMS.get(method_file.stem, 0) if on_ast else 0
    head = D * CLASSES + CLASSES
    trainable = method + head + final_norm + sublayer_norms
    assert summary["backbone_params"] == BACKBONE[backbone]
    assert summary["method_params"] == method
    assert summary["head_params"] == head
    assert summary["final_norm_params"] == final_norm
    assert summary["sublayer_norm_params"] == sublayer_norms
    assert summary["trainable_params"] == trainable
    assert summary["trainable_percent"] == pytest.approx(100 * trainable / BACKBONE[backbone])
    assert summary["method_percent"] == pytest.approx(100 * method / BACKBONE[backbone])
    beside = {"adapter": ["FFN"], "conformer_adapter": ["FFN"], "dense_moa": ["MHSA"], "soft_moa": ["MHSA"]}
    assert summary.get("adapted_sublayers") == beside.get(method_file.stem)


@pytest.mark.parametrize(
    ("options", "beside"),
    [(["--adapter_location=MHSA"], "MHSA"), (["--adapter_type=Houlsby"], "MHSA and FFN"), ([], "FFN")],
)
def test_summary_says_where_the_adapters_sit(checkpoints, capsys, options, beside):
    path = LIBRARY_HPARAMS / "methods" / "adapter.yaml"
    assert summary_main([str(path), f"--backbone_source={checkpoints['ast']}", "--target_length=100", *options]) == 0
    assert f"  beside sub-layers     {beside:>12}\n" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["FSC", "ESC50", "UrbanSound8K", "GSC", "IEMOCAP"])
def test_summary_of_a_recipe_file_needs_no_data(checkpoints, capsys, tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    path = REPO / "recipes" / dataset / "hparams" / "conformer_adapter.yaml"
    assert summary_main([str(path), f"--backbone_source={checkpoints['ast']}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    classes = {"FSC": 31, "ESC50": 50, "UrbanSound8K": 10, "GSC": 35, "IEMOCAP": 4}[dataset]
    assert summary["method"] == "conformer_adapter"
    assert summary["head_params"] == 32 * classes + classes
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_summary_reports_bad_input_in_one_line(checkpoints, capsys):
    code = summary_main([str(METHOD_FILES[0]), f"--backbone_source={checkpoints['ast']}", "--reduction_rat=4"])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_conformer_adapter_is_029_percent_of_the_full_size_ast(tmp_path):
    """The papers' headline: Conformer adapter, rate 96, Pfeiffer, parallel = 0.29 % of AST (86.19 M)."""
    from petl_modules.random_backbones import write_random_checkpoint

    folder = write_random_checkpoint("ast", tmp_path / "ast_base", size="base")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "petl_apps.summary",
            str(LIBRARY_HPARAMS / "methods" / "conformer_adapter.yaml"),
            f"--backbone_source={folder}",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    summary = json.loads(result.stdout)
    assert summary["backbone_params"] == pytest.approx(86.19e6, rel=1e-3)
    # 12 layers x (LN 1536 + pointwise 768->16 12304 + depthwise 8x31 256 + BN 16 + pointwise 8->768 6912)
    assert summary["method_params"] == 12 * 21024
    assert round(summary["method_percent"], 2) == 0.29
