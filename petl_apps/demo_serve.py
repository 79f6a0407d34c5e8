"""`make serve`: the HTTP server (`petl_modules.serve`) on the demo's two tasks, on its one pretrained backbone.

    python -m petl_apps.demo_serve [--output_folder=demo_output] [--port 8000] [--host 127.0.0.1] [...]

After `make demo` (`petl_apps/demo.py`), it serves two tasks trained on the demo's frozen backbone:

- `words`: the ten command words, the demo's words run picked by `words_run`'s rule: of the methods in
  `demo_results.json`, those that keep the pretrained backbone as it is (not `full_ft`, which trains it and cannot
  share it, nor `linear_random_init`, which replaces its weights with random ones), the best valid accuracy; ties
  go to fewer trainable parameters, then to the method name;
- `noise`: the background noise of a clip (none, white, pink or brown noise, mains hum), the demo's noise run
  (`noise_runs/<NOISE_METHOD>`).

It prints which runs it serves, then the server prints the page's address. Every option other than
`--output_folder` goes to `python -m petl_modules.serve` as given (`--port`, `--host`, `--device`, ...). Without
the demo's outputs it prints one line naming what is missing and `run make demo first`, and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from petl_apps.demo import NOISE_METHOD, DemoPaths
from petl_modules import serve

# Words runs the server cannot run on the demo's backbone, and why.
NOT_SHARED = {
    "full_ft": "trains the backbone",
    "linear_random_init": "random weights instead of the pretrained backbone",
}


class DemoNotRunError(RuntimeError):
    """The demo's outputs are missing; the message names the missing file and says `run make demo first`."""


def _run_folder(folder: Path, what: str) -> Path:
    if not (folder / "results.json").is_file():
        raise DemoNotRunError(f"no {what} run in {folder} (results.json not found): run make demo first")
    return folder


def words_run(paths: DemoPaths) -> tuple[Path, dict]:
    """The words run to serve (the module's rule) and its `demo_results.json` row."""
    results = paths.output / "demo_results.json"
    if not results.is_file():
        raise DemoNotRunError(f"no demo results in {paths.output} ({results.name} not found): run make demo first")
    rows = [row for row in json.loads(results.read_text()) if row["method"] not in NOT_SHARED]
    if not rows:
        raise DemoNotRunError(
            f"{results}: no words run shares the backbone (only {', '.join(NOT_SHARED)}): run make demo first "
            "with --methods naming another method"
        )
    best = min(rows, key=lambda row: (-row["valid_accuracy"], row["trainable_params"], row["method"]))
    return _run_folder(paths.runs / best["method"], "words"), best


def noise_run(paths: DemoPaths) -> Path:
    """The noise task's run."""
    return _run_folder(paths.noise_runs / NOISE_METHOD, "noise")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m petl_apps.demo_serve",
        description=__doc__.splitlines()[0],
        epilog="Other options go to python -m petl_modules.serve (--port, --host, --device, ...).",
    )
    parser.add_argument("--output_folder", default="demo_output", help="the demo's (default: demo_output)")
    args, serve_options = parser.parse_known_args(argv)
    paths = DemoPaths(Path(args.output_folder).resolve())
    try:
        words, row = words_run(paths)
        noise = noise_run(paths)
    except DemoNotRunError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 1
    print(f"words: {words} ({row['method']}, valid accuracy {row['valid_accuracy']:.3f})", flush=True)
    print(f"noise: {noise} ({NOISE_METHOD})", flush=True)
    serve.main(["--task", f"words={words}", "--task", f"noise={noise}", *serve_options])
    return 0


if __name__ == "__main__":
    sys.exit(main())
