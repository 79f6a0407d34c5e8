"""Multi-process training: `torchrun --nproc_per_node=2 recipes/GSC/train.py ... --distributed_backend=gloo`
(two CPU processes, batch B each) gives the numbers of one process with batch 2B, and one set of files; with
BatchNorm (the conformer adapter) on CPU the statistics stay per process, so only what holds per process is checked."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

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


def torchrun(dataset: str, args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 recipes/<dataset>/train.py ARGS --distributed_backend=gloo` (two CPU processes)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(REPO / "recipes" / dataset / "train.py"),
        *args,
        "--distributed_backend=gloo",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    workspace = write_workspace(tmp_path / "workspace")
    single = recipe_args("GSC", "lora", workspace, tmp_path / "single", *OPTIONS, "--batch_size=4")
    process = run_recipe("GSC", single)
    assert process.returncode == 0, process.stderr[-3000:]

    ddp = recipe_args("GSC", "lora", workspace, tmp_path / "ddp", *OPTIONS, "--batch_size=2")
    process = torchrun("GSC", ddp)
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


def test_conformer_adapter_trains_under_two_gloo_processes_with_per_process_batchnorm(tmp_path):
    # The conformer adapter block has a BatchNorm1d. SpeechBrain converts it to SyncBatchNorm under DDP, which
    # DDP refuses for CPU modules; on CPU each process keeps plain BatchNorm (statistics over its own 2 items),
    # so the numbers differ from one process with batch 4 and only what holds per process is asserted here.
    workspace = write_workspace(tmp_path / "workspace")
    run = tmp_path / "ddp"
    process = torchrun("GSC", recipe_args("GSC", "conformer_adapter", workspace, run, *OPTIONS, "--batch_size=2"))
    assert process.returncode == 0, process.stderr[-4000:]
    output = process.stdout + process.stderr
    assert output.count("BatchNorm statistics stay per process") == 1, output[-4000:]  # rank 0 says it once

    assert [path.relative_to(run) for path in run.rglob(RESULTS)] == [Path(RESULTS)]
    results = json.loads((run / RESULTS).read_text())["folds"]["official"]
    for split in ("valid", "test"):
        assert all(math.isfinite(value) for name, value in results[split].items() if name != "confusion_matrix")
    state = model_state(run)
    norms = sorted(name.removesuffix(".running_mean") for name in state if name.endswith("batch_norm.running_mean"))
    assert norms, sorted(state)
    # rank 0 wrote the checkpoint: its running statistics, updated once per batch of its own share (2 items)
    rank_steps = math.ceil(results["train_items"] / 2 / 2)
    for norm in norms:
        mean, var = state[f"{norm}.running_mean"], state[f"{norm}.running_var"]
        assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var > 0).all(), norm
        assert not torch.equal(mean, torch.zeros_like(mean)) and not torch.equal(var, torch.ones_like(var)), norm
        assert state[f"{norm}.num_batches_tracked"].item() == 2 * rank_steps, norm
    assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())
    assert not torch.equal(state["head.linear.weight"], torch.zeros_like(state["head.linear.weight"]))
    assert len(list((run / "save").glob("CKPT+*"))) >= 1
    assert not list(run.rglob(".*.tmp")) and not list(run.rglob(".staging/*"))


def test_ddp_wrapping_keeps_plain_batchnorm_on_cpu_and_speechbrains_syncbatchnorm_elsewhere(tmp_path, monkeypatch):
    # In-process, one gloo rank: what the CPU wrapping hands to DDP, and that other devices take SpeechBrain's path.
    import speechbrain as sb
    import torch.distributed as dist

    from petl_modules.training import PETLBrain

    def brain(device: str) -> PETLBrain:
        trainable = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        frozen = torch.nn.BatchNorm1d(4).requires_grad_(False)
        brain = object.__new__(PETLBrain)  # only the attributes `_wrap_distributed` reads
        brain.modules = torch.nn.ModuleDict({"model": trainable, "frozen": frozen})
        brain.device, brain.distributed_launch, brain.data_parallel_backend = device, True, False
        brain.distributed_backend, brain.find_unused_parameters = "gloo", False
        return brain

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        cpu = brain("cpu")
        cpu._wrap_distributed()
    finally:
        dist.destroy_process_group()
    wrapped = cpu.modules["model"]
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    norms = [m for m in wrapped.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in norms] == [torch.nn.BatchNorm1d]  # not SyncBatchNorm
    assert type(cpu.modules["frozen"]) is torch.nn.BatchNorm1d  # nothing trainable: not wrapped, as in SpeechBrain

    calls = []
    monkeypatch.setattr(sb.Brain, "_wrap_distributed", lambda self: calls.append(self.device))
    for device in ("cuda:0", "cuda:1"):
        brain(device)._wrap_distributed()
    launched_alone = brain("cpu")
    launched_alone.distributed_launch = False
    launched_alone._wrap_distributed()
    assert calls == ["cuda:0", "cuda:1", "cpu"]  # GPUs (SyncBatchNorm) and non-DDP runs: SpeechBrain unchanged
