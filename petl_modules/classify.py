"""Classify audio files with a trained run or an export.

    python -m petl_modules.classify --run DIR AUDIO [AUDIO ...] [--top_k 5] [--json]
        [--window_seconds S [--hop_seconds H]] [--device cpu|cuda] [--backbone_source X]

`--run` is a recipe run folder, a recipe output folder holding one run, or an export folder
(`python -m petl_modules.export`). Files of any sample rate, bit depth or channel count are read as 16 kHz
mono. By default each file is scored as the recipes' test stage scores it (AST: the fbank cropped or padded
to the run's `target_length` frames; Wav2Vec2: the whole file). `--window_seconds S` scores windows of S
seconds every H seconds (default S/2, the last window ending at the file's end) and averages their class
probabilities: use it for files longer than the training clips. Prints, per file, the best class and its
probability, then the top k; `--json` prints one JSON list of {file, label, score, top_k: [{label, score}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    parser.add_argument("--run", required=True, help="a run folder, a recipe output folder with one run, or an export")
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
        records = classify(
            args.run, args.audio, args.top_k, args.window_seconds, args.hop_seconds, args.device, overrides
        )
    except USER_ERRORS as error:
        sys.exit(f"classify: error: {error}")
    print(json.dumps(records, indent=2) if args.json else format_records(records))
    return records


if __name__ == "__main__":
    main()
