"""Multi-process training: `torchrun --nproc_per_node=2 recipes/GSC/train.py ... --distributed_backend=gloo`
(two CPU processes, batch B each) gives the numbers of one process with batch 2B, and one set of files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from recipe_helpers import ENV, REPO, recipe_args, run_recipe, write_workspace

from petl_modules.recipe import RESULTS

OPTIONS = ["--number_of_epochs=2", "--lr=0.05"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_state(run) -> dict[str, torch.Tensor]:
    checkpoint = max((run / "save").glob("CKPT+*"), key=lambda path: path.stat().st_mtime)
    return torch.load(checkpoint / "model.ckpt", weights_only=True)


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    workspace = write_workspace(tmp_path / "workspace")
    single = recipe_args("GSC", "lora", workspace, tmp_path / "single", *OPTIONS, "--batch_size=4")
    process = run_recipe("GSC", single)
    assert process.returncode == 0, process.stderr[-3000:]

    ddp = recipe_args("GSC", "lora", workspace, tmp_path / "ddp", *OPTIONS, "--batch_size=2")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(REPO / "recipes" / "GSC" / "train.py"),
        *ddp,
        "--distributed_backend=gloo",
    ]
    process = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]

    expected = json.loads((tmp_path / "single" / RESULTS).read_text())
    results = json.loads((tmp_path / "ddp" / RESULTS).read_text())
    steps = expected["folds"]["official"]["train_items"] // 4
    assert steps >= 2  # several optimizer steps per epoch, each on 2 x 2 items
    for split in ("valid", "test"):
        for name, value in expected["folds"]["official"][split].items():
            got = results["folds"]["official"][split][name]
            assert got == (value if name == "confusion_matrix" else pytest.approx(value, abs=1e-6)), (split, name)
    reference, trained = model_state(tmp_path / "single"), model_state(tmp_path / "ddp")
    assert reference.keys() == trained.keys()
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=0, atol=1e-6)
    assert not torch.equal(reference["head.linear.weight"], torch.zeros_like(reference["head.linear.weight"]))
    # one set of files: rank 0 alone wrote them (no staging folders or temporary files left behind)
    assert len(list((tmp_path / "ddp" / "save").glob("CKPT+*"))) == len(
        list((tmp_path / "single" / "save").glob("CKPT+*"))
    )
    assert not list((tmp_path / "ddp").rglob(".*.tmp")) and not list((tmp_path / "ddp").rglob(".staging/*"))
