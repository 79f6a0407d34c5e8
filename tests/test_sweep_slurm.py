"""`python -m petl_apps.sweep --slurm`: the job array's lines run for real, under plain bash (no SLURM here), on
generated data with a tiny random AST: paper presets one task per run on GSC (two tasks at once, then the report,
then a finished line again: a no-op), and one task per fold on ESC50 (two folds at once in one output folder, with
a grid value), after which the array is written again for the folds left."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_helpers import ENV, QUICK_OPTIONS, REPO

from petl_apps.sweep import main
from petl_apps.synthetic import make_esc50, make_gsc
from petl_modules.random_backbones import write_random_checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep_slurm")
    make_gsc(root / "data", num_words=4, n_per_class=2)
    make_esc50(root / "data", num_classes=3, n_per_fold=2)
    return {"data": root / "data", "ast": write_random_checkpoint("ast", root / "ast")}


def sweep(*argv: str) -> tuple[int, list[str]]:
    stream = io.StringIO()
    code = main(list(argv), stream=stream)
    return code, stream.getvalue().splitlines()


def run_tasks(slurm: Path, tasks: list[int], cwd: Path) -> list[subprocess.CompletedProcess]:
    """`SLURM_ARRAY_TASK_ID=i bash array.sbatch` for each task at once, from `cwd`."""
    processes = [
        subprocess.Popen(
            ["bash", str(slurm / "array.sbatch")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**ENV, "SLURM_ARRAY_TASK_ID": str(task)},
        )
        for task in tasks
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(processes, outputs)]


def test_paper_runs_as_array_tasks_then_the_report(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out, slurm = tmp_path / "out", tmp_path / "slurm"
    argv = ["--paper=table1", "--datasets=GSC", "--methods=lora,dpt25", f"--data_root={workspace['data']}"]
    argv += [f"--backbone_source={workspace['ast']}", f"--output_folder={out}", f"--slurm={slurm}"]
    argv += ["--sbatch=--gres=gpu:1", "--", "--num_classes=4", *QUICK_OPTIONS]
    code, lines = sweep(*argv)
    assert code == 0 and lines[0] == f"{slurm}/runs.txt: 2 task(s) for 2 unfinished run(s) of 2"
    tasks = (slurm / "runs.txt").read_text().splitlines()
    assert [line.split()[5] for line in tasks] == [f"recipes/GSC/hparams/paper/{p}.yaml" for p in ("dpt25", "lora")]
    assert all(line.startswith(f"cd {REPO} && {sys.executable} recipes/GSC/train.py ") for line in tasks)
    assert not any("--fold" in line for line in tasks)  # GSC has one official split: a task per run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for task, done in zip((1, 2), run_tasks(slurm, [1, 2], elsewhere)):
        assert done.returncode == 0 and done.stdout.endswith(f"task {task}: exit status 0\n"), done.stdout[-3000:]
    for preset in ("dpt25", "lora"):
        results = json.loads((out / f"GSC/paper/{preset}/seed10/results.json").read_text())
        assert results["settings"]["paper_preset"] == preset and results["folds_missing"] == []
        assert results["backbone_source"] == str(workspace["ast"]) and results["seed"] == 10

    report = subprocess.run(["bash", str(slurm / "report.sbatch")], capture_output=True, text=True, cwd=elsewhere)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "lora" in (out / "report/report.md").read_text() and (out / "report/accuracy_vs_params.png").is_file()

    stamp = (out / "GSC/paper/dpt25/seed10/fold_result.json").stat().st_mtime_ns
    again = run_tasks(slurm, [1], elsewhere)[0]  # a finished line: the recipe skips its fold
    assert again.returncode == 0 and "is finished with these settings" in again.stdout
    assert (out / "GSC/paper/dpt25/seed10/fold_result.json").stat().st_mtime_ns == stamp

    code, lines = sweep(*argv)
    assert code == 0 and lines[0] == f"{slurm}/runs.txt: 0 task(s) for 0 unfinished run(s) of 2"
    assert (slurm / "runs.txt").read_text() == "" and not (slurm / "array.sbatch").exists()


def test_folds_run_as_array_tasks_in_one_output_folder(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out, slurm = tmp_path / "out", tmp_path / "slurm"
    argv = ["--paper=table1", "--datasets=ESC50", "--methods=linear", f"--data_root={workspace['data']}"]
    argv += [f"--backbone_source={workspace['ast']}", f"--output_folder={out}", f"--slurm={slurm}", "--grid=lr=0.01"]
    argv += ["--", "--num_classes=3", *QUICK_OPTIONS]
    code, lines = sweep(*argv)
    run = out / "ESC50/paper/linear/lr-0.01/seed10"
    tasks = (slurm / "runs.txt").read_text().splitlines()
    assert code == 0 and lines[0] == f"{slurm}/runs.txt: 5 task(s) for 1 unfinished run(s) of 1"
    assert [line.rsplit(" ", 1)[1] for line in tasks] == [f"--fold={fold}" for fold in range(1, 6)]
    assert all(f" --output_folder={run} " in line and " --lr=0.01 " in line for line in tasks)

    for task, done in zip((1, 2), run_tasks(slurm, [1, 2], tmp_path)):
        assert done.returncode == 0 and done.stdout.endswith(f"task {task}: exit status 0\n"), done.stdout[-3000:]
    assert (run / "fold1/fold_result.json").is_file() and (run / "fold2/fold_result.json").is_file()
    results = json.loads((run / "results.json").read_text())
    assert set(results["folds"]) <= {"1", "2"} and results["folds"] and "3" in results["folds_missing"]
    assert results["settings"]["lr"] == 0.01 and results["settings"]["paper_preset"] == "linear"

    code, lines = sweep(*argv)  # the folds left, one task each
    tasks = (slurm / "runs.txt").read_text().splitlines()
    assert code == 0 and lines[0] == f"{slurm}/runs.txt: 3 task(s) for 1 unfinished run(s) of 1"
    assert [line.rsplit(" ", 1)[1] for line in tasks] == [f"--fold={fold}" for fold in (3, 4, 5)]
    assert (
        os.access(slurm / "array.sbatch", os.X_OK) and "#SBATCH --array=1-3\n" in (slurm / "array.sbatch").read_text()
    )
