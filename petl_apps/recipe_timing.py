"""Epoch wall times of real recipe runs on generated data: `benchmark --recipe_timing`.

    python -m petl_apps.benchmark --recipe_timing --backbone_source DIR --json OUT.json [--methods lora]
        [--timing_epochs 3] [--timing_words 4] [--timing_clips 6] [--batch_size 8] [--num_workers 2]
        [--device cpu|cuda] [--workdir DIR]

Writes Speech Commands in its official layout (`synthetic.make_gsc`: `timing_words` words, `timing_clips` clips
per word in each split) and runs `recipes/GSC/train.py` through its command line with `--log_timing=True`:
- `linear_cached`: linear probing from cached embeddings. `fill_s` is the cache's fill (the backbone once per
  file of every split, batched, before training; from the recipe's log), then every epoch reads one vector
  per file. Its first epoch counts as `fill_s` + the epoch; the target is later epochs >= 20 x faster.
- `linear_full`: the same with `--cache_embeddings=False` (the backbone in every step).
- each PETL method of `--methods`: the share of data loading, `data_s / train_s`, after the first epoch
  (the first fills the fbank cache); the target is < 5 %.
An epoch is its training stage plus its validation (`train_s + valid_s` in train_log.txt; see
`training.PETLBrain` for what `step_s` and `data_s` count). The machine's load average is recorded: on a
shared machine the ratios are what counts.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from petl_apps.commands import recipe_command
from petl_apps.synthetic import make_gsc

LATER_EPOCHS_SPEEDUP = 20.0  # cached linear probing: (fill + first epoch) / later epoch, at least
DATA_SHARE = 0.05  # data loading / training stage after the first epoch, below
STAT = re.compile(r"train (\w+): ([-+.\deE]+|nan|inf)")
FILL = re.compile(r"Embedding cache: (\d+) vectors computed in ([\d.]+) s")


class RecipeTimingError(RuntimeError):
    """A timed recipe run failed; the message ends with the run's last output."""


def run_command(
    method: str, data: Path, output: Path, source: str, options: dict, *extra: str, recipes: str | None = None
) -> list[str]:
    """The GSC recipe's command line for one timed run."""
    settings = {
        "data_folder": data,
        "output_folder": output,
        "backbone": "ast",
        "backbone_source": source,
        "num_classes": options["words"],
        "number_of_epochs": options["epochs"],
        "batch_size": options["batch_size"],
        "num_workers": options["num_workers"],
        "device": options["device"],
        "log_timing": True,
    }
    return recipe_command("GSC", method, settings, "--noprogressbar", *extra, recipes=recipes)


def epoch_times(train_log: Path) -> list[dict[str, float]]:
    """Per epoch, the `train <key>: value` figures of a train_log.txt written with `log_timing`."""
    epochs = []
    for line in train_log.read_text(encoding="utf-8").splitlines():
        if line.startswith("epoch: "):
            figures = {key: float(value) for key, value in STAT.findall(line) if key.endswith("_s")}
            if figures:
                epochs.append({**figures, "epoch_s": figures["train_s"] + figures["valid_s"]})
    return epochs


def fill_seconds(output: Path) -> float | None:
    """The embedding cache's fill time from the run's log.txt, None when it did not fill."""
    found = [FILL.search(line) for log in output.rglob("log.txt") for line in log.read_text().splitlines()]
    seconds = [float(match.group(2)) for match in found if match]
    return sum(seconds) if seconds else None


def timed_run(name: str, command: list[str], output: Path, log) -> dict:
    """Run one recipe command; its per-epoch figures (and the fill time) from its folder."""
    log(f"recipe timing: {name}: {' '.join(command)}")
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if process.returncode != 0:
        raise RecipeTimingError(f"{name} failed (exit {process.returncode}): {process.stderr[-2000:]}")
    epochs = epoch_times(output / "train_log.txt")
    return {"epochs": epochs, "fill_s": fill_seconds(output)}


def later(epochs: list[dict], key: str) -> float:
    """The median of `key` over the epochs after the first."""
    return statistics.median(epoch[key] for epoch in epochs[1:])


def summarise(runs: dict[str, dict], methods: list[str]) -> tuple[dict, list[dict]]:
    """Ratios and the targets they meet."""
    cached, full = runs["linear_cached"]["epochs"], runs["linear_full"]["epochs"]
    first = (runs["linear_cached"]["fill_s"] or 0.0) + cached[0]["epoch_s"]
    summary = {
        "linear_cached_first_epoch_with_fill_s": first,
        "linear_cached_later_epoch_s": later(cached, "epoch_s"),
        "linear_full_later_epoch_s": later(full, "epoch_s"),
        "linear_cached_first_over_later": first / later(cached, "epoch_s"),
        "linear_full_over_cached_later_epoch": later(full, "epoch_s") / later(cached, "epoch_s"),
    }
    targets = [
        {
            "target": "linear_cached: (fill + first epoch) / later epoch",
            "value": summary["linear_cached_first_over_later"],
            "bound": f">= {LATER_EPOCHS_SPEEDUP:g}",
            "met": summary["linear_cached_first_over_later"] >= LATER_EPOCHS_SPEEDUP,
        }
    ]
    for method in methods:
        share = statistics.median(epoch["data_s"] / epoch["train_s"] for epoch in runs[method]["epochs"][1:])
        summary[f"{method}_data_share_after_first_epoch"] = share
        targets.append(
            {
                "target": f"{method}: data_s / train_s after the first epoch",
                "value": share,
                "bound": f"< {DATA_SHARE:g}",
                "met": share < DATA_SHARE,
            }
        )
    return summary, targets


def markdown(runs: dict[str, dict], targets: list[dict]) -> str:
    lines = ["| run | epoch | train_s | step_s | data_s | valid_s |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if run["fill_s"] is not None:
            lines.append(f"| {name} | fill | {run['fill_s']:.3f} | | | |")
        for number, epoch in enumerate(run["epochs"], start=1):
            figures = " | ".join(f"{epoch[key]:.3g}" for key in ("train_s", "step_s", "data_s", "valid_s"))
            lines.append(f"| {name} | {number} | {figures} |")
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']:.3g} | {t['bound']} | {'yes' if t['met'] else 'NO'} |" for t in targets]
    return "\n".join(lines)


def recipe_timing(
    source: str, methods: list[str], options: dict, workdir: str | None, log, recipes: str | None = None
) -> dict:
    """Every timed run (see the module doc); the JSON the benchmark writes. `recipes`: the recipes folder."""
    if options["epochs"] < 2:
        raise RecipeTimingError("--timing_epochs must be at least 2 (later epochs are compared with the first)")
    root = Path(workdir or tempfile.mkdtemp(prefix="recipe_timing_"))
    data = make_gsc(root / "data", num_words=options["words"], n_per_class=options["clips"])
    load_start = os.getloadavg()
    commands = {
        "linear_cached": ("linear", ["--cache_embeddings=True"]),
        "linear_full": ("linear", ["--cache_embeddings=False"]),
        **{method: (method, []) for method in methods},
    }
    runs = {}
    for name, (method, extra) in commands.items():
        output = root / "runs" / name
        runs[name] = timed_run(
            name, run_command(method, data, output, source, options, *extra, recipes=recipes), output, log
        )
    summary, targets = summarise(runs, methods)
    return {
        "command": sys.argv,
        "options": options,
        "files_per_split": options["words"] * options["clips"],
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "summary": summary,
        "targets": targets,
        "table": markdown(runs, targets),
    }
