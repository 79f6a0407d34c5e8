"""Linear probing from cached embeddings inside the recipes: the same run with and without
`cache_embeddings` gives the same metrics and checkpoints, and the backbone runs once per file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from recipe_helpers import ENV, REPO, recipe_args, run_recipe, run_recipes, train_script, write_workspace
from recipe_preludes import count_backbone_forwards
from test_ddp import free_port, model_state
from test_recipes import latest_model_state, read_manifests
from tiny_models import build_model, write_checkpoints

from petl_apps.benchmark import main as benchmark_main
from petl_apps.recipe_timing import epoch_times, fill_seconds, summarise
from petl_modules.data.audio import read_audio
from petl_modules.data.embedding_cache import EmbeddingCache
from petl_modules.linear_cached import pooled_features
from petl_modules.recipe import RESULTS

# Several epochs at a high learning rate, so that a cached path that drifted from the full one shows.
OPTIONS = ["--number_of_epochs=3", "--lr=0.05", "--batch_size=2", "--log_timing=True"]
# (case, dataset, backbone, extra options): AST on GSC; the base Wav2Vec2 (GroupNorm CNN: cached in batches of
# equal length) on ESC-50, whose SpecAugment acts on AST only and so does not stop the cache.
CASES = [
    ("ast", "GSC", "ast", []),
    ("wav2vec2", "ESC50", "wav2vec2", []),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case with and without the cache, one interpreter per variant (so each counts its own forwards)."""
    root = tmp_path_factory.mktemp("cached")
    workspace = write_workspace(root / "workspace")
    found = {}
    for variant in ("cached", "full"):
        option = f"--cache_embeddings={variant == 'cached'}"
        commands = {
            name: (
                dataset,
                recipe_args(dataset, "linear", workspace, root / variant / name, *OPTIONS, option, backbone=backbone),
            )
            for name, dataset, backbone, extra in CASES
        }
        count = root / f"{variant}_count.json"
        outcomes = run_recipes(
            list(commands.values()),
            root / f"{variant}.json",
            prelude=count_backbone_forwards,
            env={"BACKBONE_COUNT": str(count)},
        )
        for (name, _), outcome in zip(commands.items(), outcomes):
            assert outcome["code"] == 0, outcome["message"]
            found[variant, name] = root / variant / name
        found[variant, "count"] = json.loads(count.read_text())
    # One more: ESC-50's SpecAugment on AST makes the input random, so the cache stays off (and says why).
    spec = root / "specaugment"
    outcome = run_recipes(
        [("ESC50", recipe_args("ESC50", "linear", workspace, spec, "--number_of_epochs=1"))], root / "spec.json"
    )
    assert outcome[0]["code"] == 0, outcome[0]["message"]
    found["specaugment"] = spec
    return found


def log_text(output: Path) -> str:
    return "".join(path.read_text() for path in output.rglob("log.txt"))


@pytest.mark.parametrize("case", [name for name, *_ in CASES])
def test_cached_run_gives_the_metrics_and_checkpoints_of_the_full_run(runs, case):
    cached, full = runs["cached", case], runs["full", case]
    cached_results = json.loads((cached / RESULTS).read_text())
    full_results = json.loads((full / RESULTS).read_text())
    (cached_fold,) = cached_results["folds"].values()
    (full_fold,) = full_results["folds"].values()
    assert cached_fold["epoch"] == full_fold["epoch"]
    for split in ("valid", "test"):
        for name, value in full_fold[split].items():
            if name != "confusion_matrix":
                assert cached_fold[split][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (split, name)
    assert cached_fold["test"]["confusion_matrix"] == full_fold["test"]["confusion_matrix"]
    run = next(cached.rglob("train_log.txt")).parent
    full_run = full / run.relative_to(cached)
    cached_state, full_state = latest_model_state(run), latest_model_state(full_run)
    assert (
        cached_state.keys() == full_state.keys() and {"head.linear.weight", "head.linear.bias"} <= cached_state.keys()
    )
    for key, tensor in full_state.items():
        torch.testing.assert_close(cached_state[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert "Linear probing from cached embeddings" in log_text(cached)
    assert "Linear probing runs the backbone every step: cache_embeddings: False" in log_text(full)


def test_the_backbone_runs_once_per_file(runs):
    """With the cache, every file of every split goes through the backbone once, 3 epochs notwithstanding;
    without it, every epoch's training and validation run it again."""
    files = {}
    for name, *_ in CASES:
        output = runs["cached", name]
        files[name] = sum(len(split) for split in read_manifests(output).values())
        vectors = list((output / "feature_cache").glob("*/*.pt"))
        assert len(vectors) == files[name]
        assert all(torch.load(path, weights_only=True).dim() == 1 for path in vectors)  # one vector each
    assert runs["cached", "count"] == {"ASTBackbone": files["ast"], "Wav2Vec2Backbone": files["wav2vec2"]}
    assert runs["full", "count"]["ASTBackbone"] > 3 * files["ast"] / 2


def test_specaugment_on_ast_keeps_the_backbone_in_every_step(runs):
    output = runs["specaugment"]
    assert "Linear probing runs the backbone every step: cached features need deterministic input" in log_text(output)
    settings = [json.loads(path.read_text()) for path in (output / "feature_cache").glob("*/settings.json")]
    assert settings and all(entry.get("features") != "pooled_normalised_last_layer" for entry in settings)


def test_log_timing_writes_each_epochs_times_and_the_fill_is_logged(runs):
    for variant in ("cached", "full"):
        output = runs[variant, "ast"]
        epochs = epoch_times(output / "train_log.txt")
        assert len(epochs) == 3
        for epoch in epochs:
            assert epoch["step_s"] > 0 and epoch["data_s"] >= 0 and epoch["valid_s"] > 0
            # step_s + data_s = train_s, as logged (3 significant digits each)
            assert epoch["step_s"] + epoch["data_s"] == pytest.approx(epoch["train_s"], rel=0.02)
        fill = fill_seconds(output)
        assert (fill is not None and fill > 0) if variant == "cached" else fill is None


def test_timing_summary_closed_form():
    def epochs(*rows):
        return [dict(zip(("train_s", "data_s", "valid_s"), row), epoch_s=row[0] + row[2]) for row in rows]

    runs = {
        "linear_cached": {"fill_s": 9.0, "epochs": epochs((0.6, 0.3, 0.4), (0.2, 0.1, 0.3), (0.3, 0.1, 0.2))},
        "linear_full": {"fill_s": None, "epochs": epochs((6, 1, 4), (5, 0.5, 4), (5, 0.5, 3))},
        "lora": {"fill_s": None, "epochs": epochs((20, 9, 5), (10, 0.2, 4), (10, 0.8, 4))},
    }
    summary, targets = summarise(runs, ["lora"])
    assert summary["linear_cached_first_epoch_with_fill_s"] == pytest.approx(10.0)
    assert summary["linear_cached_later_epoch_s"] == pytest.approx(0.5)
    assert summary["linear_cached_first_over_later"] == pytest.approx(20.0)
    assert summary["linear_full_over_cached_later_epoch"] == pytest.approx(8.5 / 0.5)
    assert summary["lora_data_share_after_first_epoch"] == pytest.approx(0.05)  # median of 0.02 and 0.08
    assert [target["met"] for target in targets] == [True, False]  # >= 20 holds; < 5 % does not


def test_recipe_timing_needs_an_ast_folder(capsys):
    assert benchmark_main(["--recipe_timing"]) == 2
    assert capsys.readouterr().err.strip() == "error: --recipe_timing needs --backbone_source DIR (an AST folder)"
    assert benchmark_main(["--recipe_timing", "--backbone_source=x", "--methods=linear"]) == 2


def test_recipe_timing_runs_the_three_recipe_runs_it_reports(tmp_path, capsys):
    """`benchmark --recipe_timing` end to end on a tiny AST: generated GSC data, three real recipe runs."""
    from petl_modules.random_backbones import write_random_checkpoint

    source = write_random_checkpoint("ast", tmp_path / "ast")
    out = tmp_path / "timing.json"
    options = ["--timing_epochs=2", "--timing_words=2", "--timing_clips=2", "--num_workers=0"]
    argv = ["--recipe_timing", f"--backbone_source={source}", f"--json={out}", f"--workdir={tmp_path / 'work'}"]
    assert benchmark_main([*argv, *options]) == 0
    printed = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["linear_cached", "linear_full", "lora"]
    assert all(len(run["epochs"]) == 2 for run in report["runs"].values())
    assert report["runs"]["linear_cached"]["fill_s"] > 0 and report["runs"]["lora"]["fill_s"] is None
    assert report["files_per_split"] == 4  # 2 words x 2 clips
    assert "--cache_embeddings=False" in printed.split("linear_full: ", 1)[1].splitlines()[0]
    results = [
        json.loads((tmp_path / "work" / "runs" / run / RESULTS).read_text()) for run in ("linear_cached", "lora")
    ]
    assert [result["method"] for result in results] == ["linear", "lora"]


def test_ddp_two_gloo_processes_train_from_the_cache_as_one_process(tmp_path):
    """torchrun with 2 CPU processes (batch 2 each) from cached embeddings = one process with batch 4: rank 0
    fills the cache, the other rank waits and reads it, and DDP averages the head's gradients."""
    workspace = write_workspace(tmp_path / "workspace")
    options = ["--number_of_epochs=2", "--lr=0.05"]
    single = recipe_args("GSC", "linear", workspace, tmp_path / "single", *options, "--batch_size=4")
    process = run_recipe("GSC", single)
    assert process.returncode == 0, process.stderr[-3000:]
    ddp = recipe_args("GSC", "linear", workspace, tmp_path / "ddp", *options, "--batch_size=2")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [train_script("GSC"), *ddp, "--distributed_backend=gloo"]
    process = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    assert "Linear probing from cached embeddings" in log_text(tmp_path / "ddp")
    reference, trained = model_state(tmp_path / "single"), model_state(tmp_path / "ddp")
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=0, atol=1e-6)
    expected = json.loads((tmp_path / "single" / RESULTS).read_text())["folds"]["official"]["test"]
    got = json.loads((tmp_path / "ddp" / RESULTS).read_text())["folds"]["official"]["test"]
    assert got.pop("confusion_matrix") == expected.pop("confusion_matrix") and got == pytest.approx(expected, abs=1e-6)
    files = sum(len(split) for split in read_manifests(tmp_path / "ddp").values())
    assert len(list((tmp_path / "ddp" / "feature_cache").glob("*/*.pt"))) == files  # written once, by rank 0


@pytest.mark.parametrize("name", ["ast", "wav2vec2", "wav2vec2_stable"])
def test_batched_fill_gives_each_file_alone_vector_and_preload_reads_no_file(tmp_path, name):
    """Files of 3 lengths in batches of 4: AST and the LayerNorm-CNN Wav2Vec2 in padded batches, the base
    (GroupNorm CNN) one in batches of equal length; every vector is the model's on the file alone."""
    checkpoint = write_checkpoints(tmp_path / "checkpoints")[name]
    model = build_model(checkpoint, pooling="mean").train()
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index, seconds in enumerate([0.4, 0.7, 0.7, 1.0, 0.4, 0.7]):
        paths.append(tmp_path / "audio" / f"clip{index}.wav")
        paths[-1].parent.mkdir(exist_ok=True)
        sf.write(paths[-1], torch.randn(int(16000 * seconds), generator=generator).numpy(), 16000, subtype="FLOAT")
    cache = EmbeddingCache(tmp_path / "cache", model, batch_size=4)
    assert cache.fill(paths + paths[:2]) == len(paths) and cache.fill(paths) == 0  # each file once
    assert model.training and model.head.linear.training  # modes restored
    cache.preload(paths)
    for entry in cache.folder.glob("*.pt"):
        entry.unlink()  # from now on only the memory holds the vectors
    for path in paths:
        expected = pooled_features(model, read_audio(path)[None])[0]
        torch.testing.assert_close(cache(str(path)), expected, rtol=1e-5, atol=1e-5)
