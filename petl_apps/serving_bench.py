"""Many tasks on one backbone: a mixed batch's time against one task's, the memory of T tasks, and exactness.

    python -m petl_apps.benchmark --serving --backbone_source DIR [--serving_tasks 1,2,4,8] [--batch_size 16]
        [--serving_seconds 1.0] [--repeats 5] [--warmup 2] [--device cpu|cuda] [--json OUT.json]

T tasks with mixed methods (in `SERVING_METHODS` order: LoRA, bottleneck adapter, Conformer adapter, Soft-MoA,
prompt tuning, prefix tuning, BitFit, Dense-MoA; the method blocks' defaults; every trained tensor drawn at
random so that none is at its zero initialisation) on the AST of `--backbone_source` at the input of
`--serving_seconds` (100 fbank frames a second). One `MultiTaskClassifier` holds the T tasks. For each T:

- `mixed_s`: median time of `class_probabilities` on a batch of `--batch_size` random clips spread round robin over
  the T tasks; `one_task_s`: the same batch, every clip on the first task, timed in the same rounds (alternating);
  `ratio`: the median over rounds of the two within a round (machine noise hits both alike);
  `ratio_without_prompts` (T with prompt tuning among the tasks): the same for the batch spread over the other
  tasks, timed in the same rounds: prompt rows are longer and every row is padded to them;
- `state_bytes`: the parameters and buffers of the classifier holding the T tasks; `separate_bytes`: those of T
  separate models (each with its own backbone, as T `AudioClassifier`s hold them); the ratios against one task's
  classifier (parameters and buffers dominate a process's memory at inference; activations are one batch's);
- `max_abs_diff`: the largest difference, over the batch, between a clip's class probabilities in the mixed batch
  and its task's own model on that clip alone (the exactness contract: at most 1e-5 in fp32).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from petl_modules.hparams_loader import LIBRARY_HPARAMS, load_hparams
from petl_modules.model import PETLModel
from petl_modules.multitask import MultiTaskClassifier

SERVING_METHODS = (
    "lora",
    "adapter",
    "conformer_adapter",
    "soft_moa",
    "prompt_tuning",
    "prefix_tuning",
    "bitfit",
    "dense_moa",
)
FRAMES_PER_SECOND = 100
NUM_CLASSES = 10


def random_task(source: str, method: str, target_length: int, seed: int) -> PETLModel:
    """A model of `method` on the AST of `source` whose trained tensors (and BatchNorm statistics) are random."""
    torch.manual_seed(seed)
    overrides = {"backbone": "ast", "backbone_source": source, "target_length": target_length}
    overrides["num_classes"] = NUM_CLASSES
    model = load_hparams(
        LIBRARY_HPARAMS / "methods" / f"{method}.yaml", overrides, defaults=(LIBRARY_HPARAMS / "model.yaml",)
    )["model"].eval()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in model.trainable_state_dict():
            target = parameters[name] if name in parameters else model.get_buffer(name)
            if target.is_floating_point():
                noise = torch.randn_like(target) * 0.05
                target.copy_(target * (1 + noise.abs()) if name.endswith("running_var") else target + noise)
    return model


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers `module` holds (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _timed(classifier: MultiTaskClassifier, wavs: torch.Tensor, lens: torch.Tensor, tasks: list[str]) -> float:
    """Seconds of one `class_probabilities` call (synchronised on CUDA)."""
    device = classifier.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    classifier.class_probabilities(wavs, lens, tasks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def serving_benchmark(
    source: str,
    task_counts: Sequence[int] = (1, 2, 4, 8),
    batch_size: int = 16,
    seconds: float = 1.0,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per T of `task_counts` (see the module's docstring)."""
    target_length = round(seconds * FRAMES_PER_SECOND)
    generator = torch.Generator().manual_seed(0)
    samples = round(seconds * 16000)
    wavs = torch.randn(batch_size, samples, generator=generator) * 0.1
    lens = torch.ones(batch_size)
    rows = []
    for count in task_counts:
        methods = [SERVING_METHODS[index % len(SERVING_METHODS)] for index in range(count)]
        log(f"[serving] T={count}: {', '.join(methods)}")
        classifier = MultiTaskClassifier(device)
        own, names = {}, []
        for index, method in enumerate(methods):
            name = f"t{index}_{method}"
            model = random_task(source, method, target_length, seed=index)
            own[name] = copy.deepcopy(model).to(device)
            options = {"target_length": target_length}
            classifier.add_model(name, model, [str(c) for c in range(NUM_CLASSES)], "ast", source, options)
            names.append(name)
        spread = [names[row % count] for row in range(batch_size)]
        single = [names[0]] * batch_size
        # Where prompts are among the tasks, the same batch spread over the others: what prompts cost everyone
        # (their rows are longer, so every row of the batch is padded to their length).
        unprompted = [name for name in names if "prompt_tuning" not in name]
        spread_without = [unprompted[row % len(unprompted)] for row in range(batch_size)]
        with_prompts = len(unprompted) < len(names) and bool(unprompted)
        mixed_times, one_times, ratios, without_ratios = [], [], [], []
        for round_index in range(warmup + repeats):
            mixed = _timed(classifier, wavs, lens, spread)
            one = _timed(classifier, wavs, lens, single)
            without = _timed(classifier, wavs, lens, spread_without) if with_prompts else None
            if round_index >= warmup:
                mixed_times.append(mixed)
                one_times.append(one)
                ratios.append(mixed / one)
                if without is not None:
                    without_ratios.append(without / one)
        probabilities = classifier.class_probabilities(wavs, lens, spread)
        with torch.no_grad():
            difference = max(
                float((probabilities[row] - own[name](wavs[row : row + 1].to(device)).softmax(-1)[0].cpu()).abs().max())
                for row, name in enumerate(spread)
            )
        one_task = state_bytes(own[names[0]])
        separate = sum(state_bytes(model) for model in own.values())
        holding = state_bytes(classifier)
        rows.append(
            {
                "tasks": count,
                "methods": methods,
                "batch_size": batch_size,
                "seconds": seconds,
                "mixed_s": statistics.median(mixed_times),
                "one_task_s": statistics.median(one_times),
                "ratio": statistics.median(ratios),
                "ratio_without_prompts": statistics.median(without_ratios) if without_ratios else None,
                "state_bytes": holding,
                "one_task_bytes": one_task,
                "separate_bytes": separate,
                "state_ratio_vs_one_task": holding / one_task,
                "state_ratio_vs_separate": holding / separate,
                "max_abs_diff": difference,
            }
        )
        log(
            f"[serving] T={count}: mixed {rows[-1]['mixed_s']:.3f} s, one task {rows[-1]['one_task_s']:.3f} s "
            f"(x{rows[-1]['ratio']:.2f}); memory x{rows[-1]['state_ratio_vs_one_task']:.3f} of one task, "
            f"x{rows[-1]['state_ratio_vs_separate']:.3f} of {count} separate; max |diff| {difference:.1e}"
        )
    return rows


def serving_table(rows: Sequence[dict]) -> str:
    lines = [
        "| tasks | mixed batch (s) | one task (s) | time x one task | without prompt rows | memory (MiB) "
        "| x one task | x separate | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        without = "-" if row["ratio_without_prompts"] is None else f"{row['ratio_without_prompts']:.2f}"
        lines.append(
            f"| {row['tasks']} | {row['mixed_s']:.3f} | {row['one_task_s']:.3f} | {row['ratio']:.2f} | {without} | "
            f"{row['state_bytes'] / 2**20:.1f} | {row['state_ratio_vs_one_task']:.3f} | "
            f"{row['state_ratio_vs_separate']:.3f} | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


__all__ = ["SERVING_METHODS", "random_task", "serving_benchmark", "serving_table", "state_bytes"]
