"""The main job on an embedded default: several methods compared on a small keyword task, on a CPU.

    python -m petl_modules.demo [--output_folder=demo_output] [--methods=linear,lora,...] [--epochs=N]

It writes a synthetic keyword data set in the Speech Commands v2 layout and a tiny AST with random
weights (no download), runs the GSC recipe once per method, and prints one table of trainable parameters
and accuracies (also written to <output_folder>/results.md). Rerunning reuses every finished run.
The backbone is not pretrained, so the numbers show the pipeline at work, not the methods' merit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .checkpoints import write_random_checkpoint
from .data.synthetic import make_gsc
from .recipe import REPO_ROOT, USER_ERRORS, load_recipe, run

DEFAULT_METHODS = ("linear", "bitfit", "lora", "adapter", "conformer_adapter", "prompt_tuning", "soft_moa")
NUM_WORDS = 6


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per method."""
    lines = ["| method | trainable params | % of backbone | valid accuracy | test accuracy |", "|---|---|---|---|---|"]
    for method, summary in results.items():
        parameters = summary["parameters"]
        lines.append(
            f"| {method} | {parameters['trainable']:,} | {parameters['trainable_percent']:.2f} % | "
            f"{summary['mean']['valid']['accuracy']:.3f} | {summary['mean']['test']['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_folder", default="demo_output")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method files of recipes/GSC/hparams"
    )
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from the hub
    logging.basicConfig(level=logging.WARNING)

    output = Path(args.output_folder).resolve()
    data_folder = output / "data" / "speech_commands_v0.02"
    if not (data_folder / "testing_list.txt").is_file():
        make_gsc(output / "data", num_words=NUM_WORDS, n_per_class=8, seed=0)
    backbone = output / "backbone_ast_tiny"
    if not (backbone / "config.json").is_file():
        write_random_checkpoint("ast", backbone)

    recipe = load_recipe("GSC")
    results = {}
    try:
        for method in args.methods.split(","):
            hparams = REPO_ROOT / "recipes" / "GSC" / "hparams" / f"{method}.yaml"
            print(f"[demo] {method} ...", flush=True)
            results[method] = run(
                recipe,
                [
                    str(hparams),
                    f"--data_folder={data_folder}",
                    f"--output_folder={output / 'runs' / method}",
                    f"--backbone_source={backbone}",
                    f"--num_classes={NUM_WORDS}",
                    f"--number_of_epochs={args.epochs}",
                    "--batch_size=8",
                    "--num_workers=0",
                    "--device=cpu",
                    "--noprogressbar",
                ],
            )
    except USER_ERRORS as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    table = results_table(results)
    (output / "results.md").write_text(
        f"Synthetic keywords ({NUM_WORDS} words), tiny random-weight AST, {args.epochs} epochs.\n\n{table}\n"
    )
    print(table)
    print(f"\n[demo] runs, logs and results.json files under {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
