"""HyperPyYAML composition, command-line overrides and the parameter summary tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import write_checkpoints

from petl_modules.backbones import build_backbone
from petl_modules.hparams_loader import LIBRARY_HPARAMS, HparamsError, load_hparams
from petl_modules.summary import main as summary_main

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
    groups = ("method_params", "head_params", "final_norm_params", "sublayer_norm_params")
    # Recounted independently: the model built from the same block counts its trainable tensors, and a bare
    # backbone (no method injected) counts the pretrained parameters.
    model = load_hparams(
        method_file,
        {"backbone": backbone, "backbone_source": str(source), "target_length": 100},
        defaults=(LIBRARY_HPARAMS / "model.yaml",),
    )["model"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_params = sum(p.numel() for p in build_backbone(backbone, str(source), target_length=100).parameters())
    assert summary["trainable_params"] == trainable == sum(summary[group] for group in groups)
    assert summary["backbone_params"] == backbone_params
    assert summary["trainable_percent"] == pytest.approx(100 * trainable / backbone_params)
    assert summary["head_params"] == 32 * 10 + 10


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
    from petl_modules.checkpoints import write_random_checkpoint

    folder = write_random_checkpoint("ast", tmp_path / "ast_base", size="base")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "petl_modules.summary",
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
