"""The quick-start demo: its table and demo_results.json from recorded runs, and one small end-to-end run."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch
from transformers import ASTModel

from petl_apps import demo
from petl_apps.pretrain import PretrainSettings
from petl_modules.backbones.ast import FbankFrontEnd

RECORDED = {  # method -> (trainable, backbone, valid accuracy, test accuracy, seconds)
    "linear_random_init": (2314, 1_840_000, 0.31, 0.295, 21.04),
    "lora": (39_178, 1_840_000, 0.93, 0.9166, 48.5),
}


def record_run(runs, method, trainable, backbone, valid, test, seconds):
    """A run folder as the GSC recipe and the demo leave it (only the keys the table reads, plus others)."""
    folder = runs / method
    folder.mkdir(parents=True)
    results = {
        "method": method,
        "parameters": {"trainable": trainable, "backbone": backbone, "trainable_percent": 100 * trainable / backbone},
        "mean": {"valid": {"loss": 1.0, "accuracy": valid}, "test": {"loss": 1.1, "accuracy": test}},
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / demo.RUN_INFO).write_text(json.dumps({"method": method, "train_seconds": seconds}))


def test_table_and_json_come_from_the_recorded_runs(tmp_path):
    for method, values in RECORDED.items():
        record_run(tmp_path, method, *values)
    rows = demo.collect_results(tmp_path, list(RECORDED))
    assert [list(row) for row in rows] == [list(demo.RESULT_KEYS)] * 2
    assert rows[1] == {
        "method": "lora",
        "trainable_params": 39_178,
        "trainable_percent": pytest.approx(2.12924, abs=1e-5),
        "valid_accuracy": 0.93,
        "test_accuracy": 0.9166,
        "train_seconds": 48.5,
    }
    table = demo.results_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [
        " method ",
        " trainable params ",
        " % of backbone ",
        " valid accuracy ",
        " test accuracy ",
        " training seconds ",
    ]
    assert table[2] == "| linear_random_init | 2,314 | 0.13 % | 0.310 | 0.295 | 21 |"
    assert table[3] == "| lora | 39,178 | 2.13 % | 0.930 | 0.917 | 48 |"


def test_an_unknown_method_is_named_before_any_work(tmp_path, capsys):
    assert demo.main([f"--output_folder={tmp_path}", "--methods=linear,lorra"]) == 1
    assert "recipes/GSC/hparams/lorra.yaml" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_end_to_end_at_small_size_reuses_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPEAKERS", {"train": 2, "valid": 1, "test": 1})
    monkeypatch.setattr(demo, "CLIPS_PER_SPEAKER", {"train": 1, "valid": 1, "test": 1})
    monkeypatch.setattr(
        demo,
        "PRETRAIN",
        PretrainSettings(
            num_words=3, num_speakers=2, epochs=1, batch_size=4, hidden_size=32, num_layers=1, num_heads=2
        ),
    )
    argv = [f"--output_folder={tmp_path}", "--methods=linear_random_init,linear", "--epochs=1"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "SMALL SYNTHETIC DEMO" in out and "MIT/ast-finetuned-audioset-10-10-0.4593" in out
    rows = json.loads((tmp_path / "demo_results.json").read_text())
    assert [row["method"] for row in rows] == ["linear_random_init", "linear"]
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"]  # same architecture, same head
    assert all(0.0 <= row["test_accuracy"] <= 1.0 and row["train_seconds"] > 0 for row in rows)
    assert (tmp_path / "demo_results.md").read_text().count("\n| linear") == 2
    run = tmp_path / "runs" / "linear_random_init"
    assert "linear_random_init" in (run / "hyperparams.yaml").read_text()
    assert (run / "demo_recipe.log").is_file() and (tmp_path / "report" / "accuracy_vs_params.png").is_file()

    assert_linear_probed_the_pretrained_weights(tmp_path)

    stamp = (run / demo.RUN_INFO).stat().st_mtime_ns
    assert demo.main(argv) == 0
    assert (run / demo.RUN_INFO).stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "demo_results.json").read_text()) == rows


def assert_linear_probed_the_pretrained_weights(output):
    """`linear`'s embedding cache holds the PRETRAINED AST's vectors, computed here with transformers alone.

    The control has its own: both runs name the same --backbone_source, once the cache's whole key, so the
    control (run first) cached its random-weight vectors where `linear` then read them. Now the key digests
    the weights: two caches, and exactly one holds the pretrained AST's vectors.
    """
    caches = {
        path.parent: json.loads(path.read_text()) for path in (output / "feature_cache").glob("*/*/settings.json")
    }
    embeddings = {
        folder: key for folder, key in caches.items() if key.get("features") == "pooled_normalised_last_layer"
    }
    assert len({key["weights"] for key in embeddings.values()}) == len(embeddings) == 2
    backbone = output / "backbone_ast_pretrained"
    preprocessor = json.loads((backbone / "preprocessor_config.json").read_text())
    front_end = FbankFrontEnd(100, 128, mean=preprocessor["mean"], std=preprocessor["std"])
    ast = ASTModel.from_pretrained(backbone).eval()
    wavs = sorted((output / "data" / "speech_commands_v0.02").glob("[a-z]*/*.wav"))
    fbank = torch.stack([front_end.single(torch.from_numpy(sf.read(wav, dtype="float32")[0])) for wav in wavs])
    with torch.no_grad():
        last = ast(fbank, output_hidden_states=True).hidden_states[-1]
    expected = torch.nn.functional.layer_norm(last, last.shape[-1:], eps=ast.config.layer_norm_eps).mean(dim=1)
    matches = []
    for folder in embeddings:
        cached = torch.stack([torch.load(path, weights_only=True) for path in sorted(folder.glob("*.pt"))])
        assert len(cached) == len(expected) == 40
        # The cache's file names hash paths: match vectors instead (exact distances, not the matmul shortcut).
        distance = torch.cdist(expected, cached, compute_mode="donot_use_mm_for_euclid_dist")
        matches.append(bool(distance.min(dim=1).values.max() < 1e-4))
    assert sorted(matches) == [False, True]
