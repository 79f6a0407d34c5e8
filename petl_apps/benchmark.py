"""Training-step time, peak memory, forward FLOPs and inference latency of every method, in one run.

    python -m petl_apps.benchmark --backbone_source DIR --json OUT.json [--wav2vec2_source DIR] [--wavlm_source DIR] ...
        [--backbones ast,wav2vec2,...,whisper] [--methods all|m1,m2,...] [--frames 100] [--batch_size 8]
        [--device cpu|cuda] [--precision fp32|bf16] [--compile] [--repeats 5] [--warmup 2]
        [--no_memory] [--no_timing]
    python -m petl_apps.benchmark --scaling --backbone_source DIR --json OUT.json --plot OUT.png
        [--methods full_ft,lora,adapter] [--scaling_frames 100,256,512,1024] [--scaling_batch_sizes 1,2,4,8]
    python -m petl_apps.benchmark --recipe_timing --backbone_source DIR --json OUT.json [--methods lora]
        [--timing_epochs 3] [--timing_words 4] [--timing_clips 6] [--batch_size 8] [--num_workers 2] [--workdir DIR]
        (real GSC recipe runs on generated data: epoch times of linear probing with and without cached
        embeddings, and the share of data loading; see recipe_timing.py)
    python -m petl_apps.benchmark --serving --backbone_source DIR [--serving_tasks 1,2,4,8] [--batch_size 16]
        [--serving_seconds 1.0] [--json OUT.json]
        (many tasks on one backbone: a mixed batch against one task, memory, exactness; see serving_bench.py)

Rows are the library's method blocks (`hparams/methods/<name>.yaml`, named as the recipes' hparams files;
`<name>+ckpt` adds `activation_checkpointing: True`) and four references:
`frozen_input_grad` (linear probing with the gradient also flowing through every frozen layer to the first
layer's input: the floor of any method that trains something inside the network), `forward_only` (no
gradients), `linear_cached` (a linear-probing step from cached pooled features, `linear_cached.py`) and
`lora_merged` (LoRA folded into the weights: inference only). Inputs are random: a backbone with a front end
gets features of `frames` 10-ms frames (the feature cache's form: AST's fbank, Whisper's log-mel in its clip
window; `--frames 3000` is Whisper's 30 s window), the waveform encoders the waveform of the same duration.

What is measured, and how:
- step_s: median wall time of a training step (forward, cross-entropy, backward, AdamW step) after
  `warmup` rounds; every round runs one step of every row in turn (round robin), so machine noise hits all
  rows alike. infer_s: the same for a no-grad eval forward. Time ratios are the median over rounds of the
  two rows' ratio within a round (`paired_ratio`).
- peak_mem_bytes: in a fresh process per row, after one warm-up step, the peak of one more step. CUDA:
  `torch.cuda.max_memory_allocated`. CPU: the bytes of the tensors alive when the step starts (weights,
  buffers, gradients, optimizer state, inputs: counted exactly) plus the process's resident-set growth
  during the step (VmHWM reset through /proc/self/clear_refs, after `malloc_trim`). Both count everything
  alive during the step; the CPU figure leaves out the code pages and libraries the process maps.
- forward_flops: `torch.utils.flop_counter.FlopCounterMode` on one training-mode forward (matrix products,
  convolutions and attention; element-wise operations are not counted). injected_flops: the part inside the
  method's own modules (for Dense-/Soft-MoA: the MoA layers).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from petl_apps.commands import RecipesNotFoundError
from petl_apps.recipe_timing import RecipeTimingError, recipe_timing
from petl_apps.serving_bench import serving_benchmark, serving_table
from petl_modules.atomic import atomic_path, write_json_atomic
from petl_modules.backbones import BACKBONES, BackboneLoadError
from petl_modules.hparams_loader import LIBRARY_HPARAMS, load_hparams
from petl_modules.linear_cached import logits_from_pooled, pooled_features
from petl_modules.methods import METHOD_FILES
from petl_modules.methods.base import PETLModule

METHODS_DIR = LIBRARY_HPARAMS / "methods"
# The papers' order; other method blocks found in METHODS_DIR follow.
METHOD_ORDER = METHOD_FILES
# Reference row -> the method block it is built from.
REFERENCES = {"frozen_input_grad": "linear", "forward_only": "linear", "linear_cached": "linear", "lora_merged": "lora"}
INFERENCE_ONLY = ("forward_only", "lora_merged")
CHECKPOINTED = "+ckpt"
# Methods with trainable parts inside the network: their step must stay within 1.05 x frozen_input_grad.
INNER_METHODS = ("adapter", "conformer_adapter", "prompt_tuning", "prefix_tuning", "lora", "bitfit")
INNER_METHODS += ("dense_moa", "soft_moa")
SAMPLES_PER_FRAME = 160  # 10 ms at 16 kHz: waveform backbones get the audio duration of `frames` fbank frames
SOURCE_OPTIONS = tuple(kind for kind in BACKBONES if kind != "ast")  # --<kind>_source; AST: --backbone_source


def _count_cpu_attention() -> None:
    """Give the CPU's fused attention kernel the FLOP formula torch registers for the CUDA ones only
    (otherwise attention, quadratic in the tokens, would count as free on the CPU).
    """
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:

        def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        flop_counter.register_flop_formula(op)(cpu_attention_flops)


_count_cpu_attention()


class BenchmarkError(RuntimeError):
    """A benchmark option or a measurement failed; the message names the option or the row."""


def method_names() -> list[str]:
    found = {path.stem for path in METHODS_DIR.glob("*.yaml")}
    return [name for name in METHOD_ORDER if name in found] + sorted(found - set(METHOD_ORDER))


def parse_rows(spec: str) -> list[str]:
    """A comma-separated list of method names, `<method>+ckpt`, reference rows and `all` (every method and
    reference row).
    """
    methods = method_names()
    rows = []
    for row in (row.strip() for row in spec.split(",")):
        rows += [*methods, *REFERENCES] if row == "all" else [row] if row else []
    for row in rows:
        base = row.removesuffix(CHECKPOINTED)
        if base not in methods and (base not in REFERENCES or base != row):
            known = ", ".join([*methods, *REFERENCES])
            raise BenchmarkError(f"--methods: unknown row '{row}'; use all or any of {known} (methods also +ckpt)")
    return list(dict.fromkeys(rows))


@dataclass(frozen=True)
class Setup:
    """What every row of one backbone shares."""

    backbone: str
    source: str
    frames: int
    batch_size: int
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    num_classes: int = 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


class InputGradient(nn.Module):
    """A token hook that makes the first layer's input a leaf needing a gradient (the floor row)."""

    def forward(self, index: int, tokens: torch.Tensor, mask: torch.Tensor | None):
        return (tokens.detach().requires_grad_(True) if index == 0 else tokens), mask


class Row:
    """One row's model, optimizer and inputs; `step()` trains once, `infer()` runs a no-grad forward."""

    def __init__(self, name: str, setup: Setup, seed: int = 0, options: dict | None = None) -> None:
        self.name, self.setup = name, setup
        base = name.removesuffix(CHECKPOINTED)
        self.kind = base if base in REFERENCES else "method"
        self.method = REFERENCES.get(base, base)
        self.device = torch.device(setup.device)
        overrides = {
            "backbone": setup.backbone,
            "backbone_source": setup.source,
            "target_length": setup.frames,
            "num_classes": setup.num_classes,
            "activation_checkpointing": name.endswith(CHECKPOINTED),
            **(options or {}),  # any other key of the method and model blocks
        }
        torch.manual_seed(seed)
        self.hparams = load_hparams(
            METHODS_DIR / f"{self.method}.yaml", overrides, defaults=(LIBRARY_HPARAMS / "model.yaml",)
        )
        self.model = self.hparams["model"].to(self.device)
        if self.kind == "frozen_input_grad":
            self.model.backbone.token_hooks.append(InputGradient())
        if self.kind == "lora_merged":
            self.model.merge_lora()
        generator = torch.Generator().manual_seed(seed)
        front_end = self.model.backbone.front_end
        if front_end is not None:  # features computed ahead, as the recipes' feature cache gives them
            shape = (setup.batch_size, setup.frames, front_end.num_mel_bins)
            self.inputs = (torch.randn(shape, generator=generator) * 0.5).to(self.device)
        else:
            shape = (setup.batch_size, setup.frames * SAMPLES_PER_FRAME)
            self.inputs = (torch.randn(shape, generator=generator) * 0.1).to(self.device)
        self.targets = torch.randint(setup.num_classes, (setup.batch_size,), generator=generator).to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=float(self.hparams["lr"])) if self.trains else None
        self.pooled = pooled_features(self.model, self.inputs) if self.kind == "linear_cached" else None
        self.forward = torch.compile(self.model) if setup.compile else self.model
        self.model.train()

    @property
    def trains(self) -> bool:
        return self.kind not in INFERENCE_ONLY

    def autocast(self):
        enabled = self.setup.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def logits(self, compiled: bool = True) -> torch.Tensor:
        with self.autocast():
            if self.pooled is not None:
                return logits_from_pooled(self.model, self.pooled)
            return (self.forward if compiled else self.model)(self.inputs)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.logits().float(), self.targets).backward()
        self.optimizer.step()

    def infer(self) -> None:
        self.model.eval()
        try:
            with torch.no_grad():
                self.logits()
        finally:
            self.model.train()

    def run(self) -> None:
        """The row's measured operation: a training step, or a forward for inference-only rows."""
        if self.trains:
            self.step()
        else:
            self.infer()

    def flops(self) -> dict:
        """One training-mode forward: its FLOPs, those inside the method's modules, the bytes autograd keeps
        for backward beyond the model's own weights (activation memory, exact and deterministic) and the
        output token count.
        """
        captured = {}
        hook = self.model.backbone.register_forward_hook(lambda _m, _i, out: captured.update(tokens=out[0].shape[1]))
        try:
            with FlopCounterMode(display=False, depth=None) as counter:
                activation_bytes = saved_activation_bytes(lambda: self.logits(compiled=False), self.model)
        finally:
            hook.remove()
        counts = counter.get_flop_counts()
        root = type(self.model).__name__
        injected = outermost_petl_modules(self.model)
        return {
            "forward_flops": counter.get_total_flops(),
            "injected_flops": sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in injected),
            "activation_bytes": activation_bytes,
            "tokens": captured.get("tokens"),
        }

    def extra_tokens(self) -> int:
        """Keys and values attention sees beyond the sequence (prefix tuning's); prompts are in the sequence."""
        if self.method == "prefix_tuning":
            return int(self.hparams["prefix_len"])
        return 0


def saved_activation_bytes(forward, resident: nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `forward()` runs.

    Storages of `resident`'s parameters and buffers are left out: a frozen weight that autograd keeps for
    the input's gradient is in memory anyway, so only what the forward adds counts.
    """
    tensors = [*resident.parameters(), *resident.buffers()] if resident is not None else []
    excluded = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def outermost_petl_modules(model: nn.Module) -> list[str]:
    """Names of the method's modules that no other method module contains (no FLOPs counted twice)."""
    names = [name for name, module in model.named_modules() if isinstance(module, PETLModule)]
    return [name for name in names if not any(name.startswith(other + ".") for other in names)]


# --- peak memory, in a fresh process per configuration -------------------------------------------


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")


def _release_free_memory() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def live_tensor_bytes(row: Row) -> int:
    """Bytes of the tensors a row keeps between steps: weights, buffers, gradients, optimizer state, inputs."""
    tensors = [*row.model.parameters(), *row.model.buffers(), row.inputs, row.targets]
    tensors += [p.grad for p in row.model.parameters() if p.grad is not None]
    if row.optimizer is not None:
        tensors += [v for state in row.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    if row.pooled is not None:
        tensors.append(row.pooled)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == "cpu"}
    return sum(storages.values())


def probe(row_name: str, setup: Setup, timed_steps: int = 0) -> dict:
    """In this (fresh) process: the row's peak memory during one step after a warm-up step, then
    `timed_steps` more timed steps. Used through `probe_in_subprocess`.

    CUDA: `max_memory_allocated` over the step. CPU: the tensors alive when the step starts (counted
    exactly) plus the resident set's growth during the step (VmHWM, reset through /proc/self/clear_refs,
    minus VmRSS before the step). The warm-up step has already made code pages, thread pools and caches
    resident, and `malloc_trim` returned freed memory, so that growth is the step's own allocations.
    """
    device = torch.device(setup.device)
    row = Row(row_name, setup)
    row.run()  # warm-up: optimizer state, allocator caches, lazy initialisation
    sync(device)
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        row.run()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        live, before = live_tensor_bytes(row), _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        row.run()
        peak = live + max(0, _proc_status("VmHWM") - before)
    times = [timed(row.run, device) for _ in range(timed_steps)]
    return {"peak_mem_bytes": peak, "step_times": times}


def probe_in_subprocess(row_name: str, setup: Setup, timed_steps: int = 0) -> dict:
    """`probe` in a fresh Python process; {"error": ...} when it fails (out of memory, for instance)."""
    request = json.dumps({"row": row_name, "setup": asdict(setup), "timed_steps": timed_steps})
    command = [sys.executable, "-m", "petl_apps.benchmark", "--_probe", request]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        killed = result.returncode in (-9, 137)
        return {"error": "killed (out of memory?)" if killed else tail}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------


def measure_in_process(setup: Setup, rows: list[str], repeats: int, warmup: int, timing: bool, log) -> dict:
    """Counts and interleaved timings of every row; the models are freed when this returns."""
    built = {}
    for name in rows:
        log(f"[{setup.backbone}] building {name}")
        built[name] = Row(name, setup)
    results = {}
    for name, row in built.items():
        trainable = sum(p.numel() for p in row.trainable)
        results[name] = {"method": name, **asdict(setup), "trainable_params": trainable, **row.flops()}
        results[name]["extra_tokens"] = row.extra_tokens()
        results[name]["step_times"], results[name]["infer_times"] = [], []
    device = torch.device(setup.device)
    for round_index in range(warmup + repeats if timing else 0):
        started = time.perf_counter()
        for name, row in built.items():
            step = timed(row.step, device) if row.trains else None
            infer = timed(row.infer, device) if row.kind != "frozen_input_grad" else None
            if round_index >= warmup:
                results[name]["step_times"] += [step] if step is not None else []
                results[name]["infer_times"] += [infer] if infer is not None else []
        log(f"[{setup.backbone}] round {round_index + 1}/{warmup + repeats}: {time.perf_counter() - started:.1f} s")
    return results


def measure(setup: Setup, rows: list[str], repeats: int, warmup: int, memory: bool, timing: bool, log) -> list[dict]:
    """Every row of one backbone: interleaved timing in this process, then memory in fresh processes."""
    results = measure_in_process(setup, rows, repeats, warmup, timing, log)
    gc.collect()
    for name, result in results.items():
        if name == "forward_only":  # the no-gradient reference: its step is a forward
            result["step_times"] = result["infer_times"]
        result["step_s"] = statistics.median(result["step_times"]) if result["step_times"] else None
        result["infer_s"] = statistics.median(result["infer_times"]) if result["infer_times"] else None
        result["peak_mem_bytes"] = None
        if memory:
            log(f"[{setup.backbone}] peak memory of {name} (fresh process)")
            outcome = probe_in_subprocess(name, setup)
            result["peak_mem_bytes"] = outcome.get("peak_mem_bytes")
            if "error" in outcome:
                result["memory_error"] = outcome["error"]
    add_ratios(list(results.values()))
    return list(results.values())


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def paired_ratio(row: dict, reference: dict, key: str):
    """The median over rounds of row's time / reference's time in the same round (`key`: step or infer).

    Both rows ran in every round, seconds apart, so each round's ratio cancels slow drifts of the machine
    that a ratio of the two medians keeps. Falls back to that ratio when the rounds do not pair up.
    """
    times, reference_times = row.get(f"{key}_times") or [], reference.get(f"{key}_times") or []
    if times and len(times) == len(reference_times) and all(reference_times):
        return statistics.median(value / base for value, base in zip(times, reference_times))
    return _ratio(row.get(f"{key}_s"), reference.get(f"{key}_s"))


def add_ratios(results: list[dict]) -> None:
    """Each figure over full_ft's of the same run, the step over the floor, and the token ratio.

    Time ratios are paired per round (`paired_ratio`); counts (FLOPs, memory) are plain ratios.
    """
    by_name = {result["method"]: result for result in results}
    full_ft = by_name.get("full_ft", {})
    floor = by_name.get("frozen_input_grad", {})
    plain = by_name.get("forward_only", {})
    for result in results:
        result["step_ratio_vs_full_ft"] = paired_ratio(result, full_ft, "step")
        result["infer_ratio_vs_full_ft"] = paired_ratio(result, full_ft, "infer")
        result["flops_ratio_vs_full_ft"] = _ratio(result.get("forward_flops"), full_ft.get("forward_flops"))
        result["mem_ratio_vs_full_ft"] = _ratio(result.get("peak_mem_bytes"), full_ft.get("peak_mem_bytes"))
        result["step_ratio_vs_floor"] = paired_ratio(result, floor, "step")
        result["infer_ratio_vs_forward_only"] = paired_ratio(result, plain, "infer")
        base_tokens = by_name.get("linear", floor).get("tokens")
        tokens = result.get("tokens")
        if tokens and base_tokens:
            result["token_ratio"] = (tokens + result.get("extra_tokens", 0)) / base_tokens
        else:
            result["token_ratio"] = None


def check_targets(results: list[dict]) -> list[dict]:
    """The performance targets these results can decide, each with its value, limit and verdict.

    A method with parts inside the network costs at most 1.05 x the step of the frozen backbone with input
    gradients (prompt and prefix tuning: 1.05 x their token ratio); cached linear probing at most 0.05 x
    linear probing's step; merged LoRA's inference at most 1.03 x the plain forward; Soft-MoA's MoA layers at
    most 0.35 x Dense-MoA's FLOPs; at 1024 frames, PETL peak memory at most 0.5 x full fine-tuning's.
    """
    by_name = {result["method"]: result for result in results}
    checks = []

    backbone = results[0]["backbone"] if results else None

    def add(target: str, value, limit) -> None:
        if value is not None and limit is not None:
            checks.append(
                {"backbone": backbone, "target": target, "value": value, "limit": limit, "ok": bool(value <= limit)}
            )

    cached, linear = by_name.get("linear_cached", {}), by_name.get("linear", {})
    add("linear_cached step / linear step", paired_ratio(cached, linear, "step"), 0.05)
    for name in INNER_METHODS:
        row = by_name.get(name, {})
        allowance = 1.05 * (row.get("token_ratio") or 1.0) if name in ("prompt_tuning", "prefix_tuning") else 1.05
        add(f"{name} step / frozen_input_grad step", row.get("step_ratio_vs_floor"), allowance)
    merged = by_name.get("lora_merged", {})
    add("lora_merged inference / forward_only inference", merged.get("infer_ratio_vs_forward_only"), 1.03)
    soft, dense = by_name.get("soft_moa", {}), by_name.get("dense_moa", {})
    add("soft_moa MoA-layer FLOPs / dense_moa's", _ratio(soft.get("injected_flops"), dense.get("injected_flops")), 0.35)
    frames = {result["frames"] for result in results}
    if frames == {1024}:
        for name, row in by_name.items():
            if name.removesuffix(CHECKPOINTED) in (*INNER_METHODS, "linear"):
                add(f"{name} peak memory / full_ft's (1024 frames)", row.get("mem_ratio_vs_full_ft"), 0.5)
    return checks


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown_table(results: list[dict]) -> str:
    header = (
        "| backbone | method | step (s) | step x full_ft | step x floor | inference (ms) | forward GFLOPs "
        "| activations (MiB) | peak memory (MiB) | memory x full_ft |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {_fmt(r['step_s'])} | {_fmt(r['step_ratio_vs_full_ft'], digits=2)} "
            f"| {_fmt(r['step_ratio_vs_floor'], digits=2)} | {_fmt(r['infer_s'], 1e3, 1)} "
            f"| {_fmt(r['forward_flops'], 1e-9, 1)} | {_fmt(r['activation_bytes'], 2**-20, 0)} "
            f"| {_fmt(r['peak_mem_bytes'], 2**-20, 0)} "
            f"| {_fmt(r['mem_ratio_vs_full_ft'], digits=2)} |"
        )
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = ["| backbone | target | value | limit | holds |", "|---|---|---|---|---|"]
    for check in checks:
        verdict = "yes" if check["ok"] else "NO"
        lines.append(
            f"| {check['backbone']} | {check['target']} | {check['value']:.3f} | {check['limit']:.3f} | {verdict} |"
        )
    return "\n".join(lines)


# --- scaling ---------------------------------------------------------------------------------------


def scaling(
    setup: Setup, rows: list[str], frames_list: list[int], batch_list: list[int], steps: int, log
) -> list[dict]:
    """Step time and peak memory against input length (at `setup.batch_size`) and batch size (at
    `setup.frames`), each point in a fresh process; the rows alternate within each point.
    """
    grid = [("frames", frames, setup.batch_size) for frames in frames_list]
    grid += [("batch_size", setup.frames, batch) for batch in batch_list]
    points = []
    for axis, frames, batch in grid:
        for name in rows:
            point_setup = Setup(**{**asdict(setup), "frames": frames, "batch_size": batch})
            log(f"[scaling] {name} frames={frames} batch={batch}")
            outcome = probe_in_subprocess(name, point_setup, timed_steps=steps)
            times = outcome.get("step_times") or []
            points.append(
                {
                    "axis": axis,
                    "method": name,
                    "backbone": setup.backbone,
                    "frames": frames,
                    "batch_size": batch,
                    "step_s": statistics.median(times) if times else None,
                    "peak_mem_bytes": outcome.get("peak_mem_bytes"),
                    **({"error": outcome["error"]} if "error" in outcome else {}),
                }
            )
    return points


def plot_scaling(points: list[dict], path: str | Path) -> None:
    """2 x 2 panels: step time and peak memory against frames and against batch size, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, axis in enumerate(("frames", "batch_size")):
        for row_index, (key, label, scale) in enumerate(
            (("step_s", "step time (s)", 1), ("peak_mem_bytes", "peak memory (GiB)", 2**-30))
        ):
            ax = axes[row_index][column]
            for method in dict.fromkeys(p["method"] for p in points):
                series = [p for p in points if p["axis"] == axis and p["method"] == method and p[key] is not None]
                ax.plot([p[axis] for p in series], [p[key] * scale for p in series], marker="o", label=method)
            ax.set_xlabel("input frames (10 ms)" if axis == "frames" else "batch size")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    frames_axis = [p for p in points if p["axis"] == "frames"]
    batch_axis = [p for p in points if p["axis"] == "batch_size"]
    title = ", ".join(sorted({p["backbone"] for p in points}))
    title += f": frames at batch {frames_axis[0]['batch_size']}" if frames_axis else ""
    title += f"; batch sizes at {batch_axis[0]['frames']} frames" if batch_axis else ""
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


# --- command line ---------------------------------------------------------------------------------


def int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise BenchmarkError(f"{option} must be comma-separated integers; got '{text}'") from None
    if not values or min(values) < 1:
        raise BenchmarkError(f"{option} must be comma-separated positive integers; got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m petl_apps.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone_source", help="AST: hub id or local Hugging Face folder")
    for kind in SOURCE_OPTIONS:
        parser.add_argument(f"--{kind}_source", help=f"{kind}: hub id or local Hugging Face folder")
    parser.add_argument(
        "--backbones", default=None, help=f"ast,{','.join(SOURCE_OPTIONS)} (default: those with a source)"
    )
    parser.add_argument("--json", required=False, help="write the results here")
    parser.add_argument("--methods", default="all", help="all | comma-separated rows (method+ckpt allowed)")
    parser.add_argument("--frames", type=int, default=100, help="input length in 10 ms frames")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (first steps compile)")
    parser.add_argument("--repeats", type=int, default=5, help="measured round-robin rounds")
    parser.add_argument("--warmup", type=int, default=2, help="discarded rounds before those")
    parser.add_argument("--no_memory", action="store_true", help="skip the per-row peak-memory processes")
    parser.add_argument("--no_timing", action="store_true", help="FLOPs and memory only (long inputs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--scaling", action="store_true", help="step time and memory vs frames and batch size")
    parser.add_argument("--scaling_frames", default="100,256,512,1024")
    parser.add_argument("--scaling_batch_sizes", default="1,2,4,8")
    parser.add_argument("--scaling_steps", type=int, default=3, help="timed steps per scaling point")
    parser.add_argument("--plot", help="scaling: write the PNG plot here")
    parser.add_argument(
        "--recipe_timing", action="store_true", help="epoch times of GSC recipe runs (recipe_timing.py)"
    )
    parser.add_argument("--serving", action="store_true", help="many tasks on one backbone (serving_bench.py)")
    parser.add_argument("--serving_tasks", default="1,2,4,8", help="serving: task counts T")
    parser.add_argument("--serving_seconds", type=float, default=1.0, help="serving: clip length in seconds")
    parser.add_argument("--timing_epochs", type=int, default=3, help="recipe timing: epochs per run")
    parser.add_argument("--timing_words", type=int, default=4, help="recipe timing: generated GSC words")
    parser.add_argument("--timing_clips", type=int, default=6, help="recipe timing: clips per word and split")
    parser.add_argument("--num_workers", type=int, default=2, help="recipe timing: data loader workers")
    parser.add_argument("--recipes", help="recipe timing: the recipes folder (default: recipes/ here)")
    parser.add_argument("--workdir", help="recipe timing: data and runs here (default: a new temporary folder)")
    parser.add_argument("--_probe", help=argparse.SUPPRESS)
    return parser


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is visible; use --device cpu")


def setups(args) -> list[Setup]:
    sources = {"ast": args.backbone_source, **{kind: getattr(args, f"{kind}_source") for kind in SOURCE_OPTIONS}}
    names = args.backbones.split(",") if args.backbones else [name for name, source in sources.items() if source]
    if not names:
        raise BenchmarkError("give --backbone_source DIR (AST) and/or --wav2vec2_source DIR (or --<kind>_source)")
    for name in names:
        if name not in sources:
            raise BenchmarkError(f"--backbones: unknown backbone '{name}'; use {', '.join(sources)}")
        if not sources[name]:
            option = "--backbone_source" if name == "ast" else f"--{name}_source"
            raise BenchmarkError(f"--backbones {name} needs {option} DIR")
    check_device(args.device)
    for option in ("frames", "batch_size", "repeats"):
        if getattr(args, option) < 1:
            raise BenchmarkError(f"--{option} must be a positive integer; got {getattr(args, option)}")
    return [
        Setup(name, sources[name], args.frames, args.batch_size, args.device, args.precision, args.compile)
        for name in names
    ]


def timed_recipes(args, log) -> dict:
    """`--recipe_timing`: linear probing with and without cached embeddings, and `--methods` (default lora)."""
    if not args.backbone_source:
        raise BenchmarkError("--recipe_timing needs --backbone_source DIR (an AST folder)")
    methods = ["lora"] if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [method for method in methods if method not in method_names() or method == "linear"]
    if unknown:
        raise BenchmarkError(f"--methods: {unknown[0]} is not a PETL method of the recipes (linear always runs)")
    options = {
        "epochs": args.timing_epochs,
        "words": args.timing_words,
        "clips": args.timing_clips,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": "cuda:0" if args.device == "cuda" else "cpu",
    }
    return recipe_timing(args.backbone_source, methods, options, args.workdir, log, args.recipes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        request = json.loads(args._probe)
        print(json.dumps(probe(request["row"], Setup(**request["setup"]), request["timed_steps"])))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.recipe_timing:
            output = timed_recipes(args, log)
            print(output["table"])
        elif args.serving:
            if not args.backbone_source:
                raise BenchmarkError("--serving needs --backbone_source DIR (an AST folder)")
            check_device(args.device)
            counts = int_list("--serving_tasks", args.serving_tasks)
            rows = serving_benchmark(
                args.backbone_source,
                counts,
                args.batch_size,
                args.serving_seconds,
                args.repeats,
                args.warmup,
                args.device,
                log,
            )
            output = {"command": sys.argv, "threads": torch.get_num_threads(), "serving": rows}
            print(serving_table(rows))
        elif args.scaling:
            all_setups = setups(args)
            rows = parse_rows("full_ft,lora,adapter" if args.methods == "all" else args.methods)
            frames, batches = (
                int_list("--scaling_frames", args.scaling_frames),
                int_list("--scaling_batch_sizes", args.scaling_batch_sizes),
            )
            points = [p for s in all_setups for p in scaling(s, rows, frames, batches, args.scaling_steps, log)]
            output = {"command": sys.argv, "points": points}
            if args.plot:
                plot_scaling(points, args.plot)
            for point in points:
                print(
                    f"{point['backbone']} {point['method']:<20} frames={point['frames']:<5} "
                    f"batch={point['batch_size']:<3} "
                    f"step={_fmt(point['step_s'])} s  peak={_fmt(point['peak_mem_bytes'], 2**-20, 0)} MiB"
                )
        else:
            all_setups = setups(args)
            rows = parse_rows(args.methods)
            results = []
            for setup in all_setups:
                results += measure(setup, rows, args.repeats, args.warmup, not args.no_memory, not args.no_timing, log)
            checks = [
                check
                for setup in all_setups
                for check in check_targets([r for r in results if r["backbone"] == setup.backbone])
            ]
            output = {"command": sys.argv, "threads": torch.get_num_threads(), "rows": results, "targets": checks}
            print(markdown_table(results))
            if checks:
                print()
                print(targets_table(checks))
    except (BenchmarkError, RecipeTimingError, RecipesNotFoundError, BackboneLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        write_json_atomic(args.json, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
