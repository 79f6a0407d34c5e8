"""Export: the folder's content, export-then-classify equals the run, PEFT and merged forms against transformers.

The runs are tiny GSC runs trained through the recipe's command line (tests/trained_runs.py); the tiny AST
checkpoint has max_length 1024 while the runs use target_length 50, so the positional grid was adapted.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file
from speechbrain.dataio.encoder import CategoricalEncoder
from trained_runs import check_equals_test_stage, manifest_items, recipe_test_stage, trained_run, workspace
from transformers import ASTModel

from petl_modules import classify, export
from petl_modules.data import read_audio
from petl_modules.inference import AudioClassifier
from petl_modules.random_backbones import write_random_checkpoint
from petl_modules.run_folder import locate_run

TARGET_LENGTH = 50  # recipe_helpers.TARGET_LENGTH


@pytest.fixture(scope="module", params=("lora", "conformer_adapter"))
def run(request, tmp_path_factory):
    return trained_run(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "lora")


def classify_all(source, run) -> list[dict]:
    files = [path for path, _ in manifest_items(run)]
    return classify.classify(str(source), files, top_k=4, device="cpu")


def probabilities(records: list[dict]) -> torch.Tensor:
    return torch.tensor([[e["score"] for e in sorted(r["top_k"], key=lambda e: e["label"])] for r in records])


def test_export_then_classify_equals_the_run(run, tmp_path):
    out = tmp_path / "export"
    info = export.main(["--run", str(run), "--out", str(out)])
    assert sorted(path.name for path in out.iterdir()) == [
        "export.json",
        "hyperparams.yaml",
        "label_encoder.txt",
        "trained.safetensors",
    ]
    assert json.loads((out / "export.json").read_text()) == info
    # Only the checkpoint's trainable tensors, unchanged; the file is as large as they are.
    checkpoint = torch.load(locate_run(run).checkpoint, weights_only=True)
    exported = load_file(out / "trained.safetensors")
    assert exported.keys() == checkpoint.keys()
    for name, tensor in checkpoint.items():
        assert torch.equal(exported[name], tensor), name
    tensor_bytes = sum(t.numel() * t.element_size() for t in checkpoint.values())
    assert tensor_bytes < (out / "trained.safetensors").stat().st_size < tensor_bytes + 200 * len(checkpoint) + 1024
    # Label order for SpeechBrain users; provenance.
    encoder = CategoricalEncoder()
    encoder.load(out / "label_encoder.txt")
    assert [encoder.ind2lab[i] for i in range(len(encoder))] == recipe_test_stage(run)["classes"]
    results = json.loads((run / "results.json").read_text())
    assert info["trainable_parameters"] == results["parameters"]["trainable"]
    assert info["method"] == results["method"] and info["backbone"]["kind"] == "ast"
    assert info["backbone"]["revision"]["path"] == str(workspace(run.parent.parent)["ast"].resolve())
    assert len(info["backbone"]["revision"]["sha256"]) == 64
    assert info["input"]["target_length"] == TARGET_LENGTH and info["num_classes"] == 4
    # The export predicts as the run does (the recipe's test stage), also once moved elsewhere.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    records = classify_all(moved, run)
    check_equals_test_stage(records, run)
    torch.testing.assert_close(probabilities(records), probabilities(classify_all(run, run)))


def test_lora_scale_is_read_from_the_modules(lora_run, tmp_path):
    info = export.export(lora_run, tmp_path / "export")
    model = AudioClassifier.from_hparams(str(lora_run), run_opts={"device": "cpu"}).mods.model
    layers = model.lora_layers()
    assert info["lora"] == {
        "layers": len(layers),
        "rank": layers[0].lora.lora_A.out_features,
        "scale": layers[0].lora.scale,
        "dropout": 0.0,
    }
    assert info["method_options"]["alpha_lora"] == 8 and info["method_options"]["lora_targets"] == ["q", "v"]


def our_hidden_states(classifier: AudioClassifier, fbank: torch.Tensor) -> torch.Tensor:
    """Our backbone (method injected) and its final LayerNorm on an fbank batch."""
    backbone = classifier.mods.model.backbone
    with torch.no_grad():
        tokens, _ = backbone(fbank)
        return backbone.final_norm(tokens)


def fbank_batch(classifier: AudioClassifier, run) -> torch.Tensor:
    front_end = classifier.mods.model.backbone.front_end
    return torch.stack([front_end.single(read_audio(path)) for path, _ in manifest_items(run)[:3]])


@pytest.mark.parametrize("grid", ["adapted", "as_published"])
def test_peft_loads_the_lora_export_with_equal_hidden_states(lora_run, tmp_path, grid):
    """PEFT's LoRA on transformers' ASTModel reproduces our backbone + final norm.

    adapted: the checkpoint's max_length (1024) differs from target_length, so the export carries the
    adapted positional grid; as_published: a checkpoint whose max_length is target_length, loaded plainly.
    """
    options = []
    if grid == "as_published":
        source = write_random_checkpoint("ast", tmp_path / "ast50", seed=1, max_length=TARGET_LENGTH)
        options = [f"--backbone_source={source}"]
    out = tmp_path / "peft"
    info = export.main(["--run", str(lora_run), "--out", str(out), "--format", "peft", *options])
    classifier = AudioClassifier.from_hparams(str(out), run_opts={"device": "cpu"})
    layers = classifier.mods.model.lora_layers()
    adapter = info["peft"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == layers[0].lora.lora_A.out_features
    assert config["lora_alpha"] / config["r"] == pytest.approx(layers[0].lora.scale, rel=1e-12)
    assert config["modules_to_save"] == adapter["modules_to_save"] == ["layernorm"]  # the trained final norm
    assert adapter["base_model_kwargs"] == (
        {"max_length": TARGET_LENGTH, "ignore_mismatched_sizes": True} if grid == "adapted" else {}
    )
    assert (out / "position_embeddings.safetensors").is_file() == (grid == "adapted")

    base = ASTModel.from_pretrained(adapter["base_model"], **adapter["base_model_kwargs"]).eval()
    if adapter["position_embeddings"]:
        grid_state = load_file(out / adapter["position_embeddings"])
        assert grid_state["embeddings.position_embeddings"].shape == base.embeddings.position_embeddings.shape
        base.load_state_dict(grid_state, strict=False)
    fbank = fbank_batch(classifier, lora_run)
    with torch.no_grad():
        plain = base(input_values=fbank).last_hidden_state.clone()
        peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
        theirs = peft_model(input_values=fbank).last_hidden_state
    ours = our_hidden_states(classifier, fbank)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # The comparison can fail: without the adapter the base model is measurably elsewhere.
    assert (plain - ours).abs().max() > 1e-3


def test_merged_export_is_a_standalone_backbone(lora_run, tmp_path):
    out = tmp_path / "merged"
    info = export.main(["--run", str(lora_run), "--out", str(out), "--merge"])
    assert info["merged"] and sorted(load_file(out / "trained.safetensors")) == [
        "head.linear.bias",
        "head.linear.weight",
    ]
    run_classifier = AudioClassifier.from_hparams(str(lora_run), run_opts={"device": "cpu"})
    fbank = fbank_batch(run_classifier, lora_run)
    merged = ASTModel.from_pretrained(out / "backbone").eval()
    assert merged.config.max_length == TARGET_LENGTH
    with torch.no_grad():
        theirs = merged(input_values=fbank).last_hidden_state
    torch.testing.assert_close(theirs, our_hidden_states(run_classifier, fbank), atol=1e-5, rtol=1e-5)
    # classify on the merged export (plain backbone, head alone) predicts as the run.
    records = classify_all(out, lora_run)
    check_equals_test_stage(records, lora_run)
    torch.testing.assert_close(
        probabilities(records), probabilities(classify_all(lora_run, lora_run)), atol=1e-5, rtol=0
    )


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        export.main(argv)
    message = str(stop.value.code)
    assert message.startswith("export: error: ") and "\n" not in message
    return message


def test_bad_requests_are_one_line(run, tmp_path):
    out = str(tmp_path / "out")
    if run.name != "lora":
        assert "only LoRA runs have that form" in one_line_error(["--run", str(run), "--out", out, "--format", "peft"])
        assert "only LoRA runs have that form" in one_line_error(["--run", str(run), "--out", out, "--merge"])
        assert not (tmp_path / "out").exists()
        return
    message = one_line_error(["--run", str(run), "--out", out, "--merge", "--format", "peft"])
    assert "exclude each other" in message
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "not an empty folder" in one_line_error(["--run", str(run), "--out", out])
    assert "no run here" in one_line_error(["--run", str(tmp_path / "out"), "--out", str(tmp_path / "other")])


def test_a_backbone_folder_is_read_once_per_process_and_anew_when_a_file_changes(tmp_path, monkeypatch):
    """`folder_sha256` (the revision of a local backbone) against hashlib over the same bytes, and its memory:
    a second call reads no file; a file rewritten with other bytes of the same size hashes anew."""
    import hashlib
    import os

    folder = tmp_path / "backbone"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{}")
    (folder / "model.safetensors").write_bytes(b"a" * 3000)

    def expected() -> str:
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        return digest.hexdigest()

    first = export.folder_sha256(folder)
    opened = []
    monkeypatch.setattr(export, "open", lambda *args: opened.append(args) or open(*args), raising=False)
    assert first == expected() and export.folder_sha256(folder) == first and opened == []
    weights = folder / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"b" * 3000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # a later write, however coarse the clock
    assert export.folder_sha256(folder) == expected() != first and len(opened) == 2
