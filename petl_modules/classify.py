"""Classify audio files with a trained run or an export, or with several tasks sharing one backbone.

    python -m petl_modules.classify --run DIR AUDIO [AUDIO ...] [--top_k 5] [--json]
        [--window_seconds S [--hop_seconds H]] [--device cpu|cuda] [--backbone_source X]
    python -m petl_modules.classify --task NAME=DIR [--task NAME=DIR ...] AUDIO [AUDIO ...] [--top_k 5] [--json]
        [--device cpu|cuda]

`--run` is a recipe run folder, a recipe output folder holding one run, or an export folder
(`python -m petl_modules.export`). Files of any sample rate, bit depth or channel count are read as 16 kHz
mono. By default each file is scored as the recipes' test stage scores it (AST: the fbank cropped or padded
to the run's `target_length` frames; Wav2Vec2: the whole file). `--window_seconds S` scores windows of S
seconds every H seconds (default S/2, the last window ending at the file's end) and averages their class
probabilities: use it for files longer than the training clips. Prints, per file, the best class and its
probability, then the top k; `--json` prints one JSON list of {file, label, score, top_k: [{label, score}]}.

`--task NAME=DIR` (repeatable) loads each run or export as a task of one multi-task classifier
(`petl_modules.multitask`: one frozen backbone, every file through every task in mixed batches) and prints, per
file, each task's best labels; `--json` prints one object per file with a `results` list of
{task, labels: [{label, score}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .backbones import BackboneLoadError
from .data import AudioError
from .hparams_loader import HparamsError
from .inference import AudioClassifier
from .run_folder import InferenceError

USER_ERRORS = (InferenceError, AudioError, HparamsError, BackboneLoadError)


def classify(
    run: str,
    files: Sequence[str],
    top_k: int = 5,
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    device: str | None = None,
    overrides: dict | None = None,
) -> list[dict]:
    """One record per file: {file, label, score, top_k}."""
    if top_k < 1:
        raise InferenceError(f"--top_k must be at least 1; got {top_k}")
    run_opts = {"device": device} if device else None
    classifier = AudioClassifier.from_hparams(run, overrides=overrides, run_opts=run_opts)
    records = []
    for path in files:
        result = classifier.classify_file(path, top_k, window_seconds, hop_seconds)
        records.append(
            {
                "file": str(path),
                "label": result.labels[0],
                "score": float(result.scores[0]),
                "top_k": [{"label": label, "score": score} for label, score in result.top_k[0]],
            }
        )
    return records


def format_records(records: list[dict]) -> str:
    lines = []
    for record in records:
        lines.append(f"{record['file']}: {record['label']} ({record['score']:.3f})")
        lines.extend(f"    {entry['label']:<20} {entry['score']:.3f}" for entry in record["top_k"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m petl_modules.classify", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder, a recipe output folder with one run, or an export")
    source.add_argument(
        "--task", action="append", metavar="NAME=DIR", help="a task on the shared backbone (repeatable)"
    )
    parser.add_argument("audio", nargs="+", help="audio files (any rate, bit depth, channels)")
    parser.add_argument("--top_k", type=int, default=5, help="how many classes to list per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--window_seconds", type=float, help="score sliding windows of S seconds, average them")
    parser.add_argument("--hop_seconds", type=float, help="hop between windows (default: half a window)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--backbone_source", help="where the frozen backbone is now, if it moved since training")
    args = parser.parse_args(argv)
    overrides = {"backbone_source": args.backbone_source} if args.backbone_source else None
    try:
        if args.task:
            records = classify_tasks(args.task, args.audio, args.top_k, args.device, args, overrides)
        else:
            records = classify(
                args.run, args.audio, args.top_k, args.window_seconds, args.hop_seconds, args.device, overrides
            )
    except USER_ERRORS as error:
        sys.exit(f"classify: error: {error}")
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_task_records(records) if args.task else format_records(records))
    return records


def classify_tasks(
    specs: Sequence[str], files: Sequence[str], top_k: int, device: str | None, args, overrides: dict | None
) -> list[dict]:
    """`--task NAME=DIR ...`: every file through every task of one multi-task classifier."""
    from .multitask import MultiTaskClassifier

    for option in ("window_seconds", "hop_seconds"):
        if getattr(args, option) is not None:
            raise InferenceError(f"--{option} goes with --run; --task scores each whole file")
    classifier = MultiTaskClassifier(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise InferenceError(f"--task {spec}: expected NAME=DIR (a run or export folder)")
        classifier.add_task(name, folder, overrides)
    return classifier.classify_files(files, top_k=top_k)


def format_task_records(records: list[dict]) -> str:
    lines = []
    for record in records:
        lines.append(f"{record['file']}:")
        for result in record["results"]:
            best = ", ".join(f"{entry['label']} ({entry['score']:.3f})" for entry in result["labels"])
            lines.append(f"    {result['task']:<16} {best}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
