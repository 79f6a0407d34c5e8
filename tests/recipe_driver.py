"""Runs several recipe command lines in one interpreter, as `python SCRIPT ARGS...` would run each.

Usage: `python tests/recipe_driver.py COMMANDS REPORT [PRELUDE]`:

- `COMMANDS`: JSON `[[script, cwd, [args...]], ...]`. Each script runs as `__main__` with `sys.argv` set to
  `[script, *args]`, in `cwd`, with its own folder first on `sys.path` (removed again after it).
- `REPORT`: the JSON file that receives one outcome per finished command, `{"code", "message", "stdout"}`.
  `code` is the exit status (0, or `SystemExit`'s), or `"raised"` for any other exception, whose message then
  holds the type and the end of the traceback. The file is rewritten after every command, so a driver that dies
  part way still reports the commands before it.
- `PRELUDE`: optional `module:function`, imported from `sys.path` (this folder is on it) and called with no
  arguments once before the commands, e.g. to patch a class the recipes use.

A command that fails does not stop the next ones.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence


def load_function(spec: str) -> Callable[[], object]:
    """The function a `module:function` name points at (`function` may be dotted, e.g. `Class.method`)."""
    module_name, separator, qualname = spec.partition(":")
    if not separator or not module_name or not qualname:
        raise ValueError(f"a prelude is named 'module:function', got {spec!r}")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def run_command(script: str, cwd: str, args: Sequence[str]) -> dict:
    """Run `script` as `__main__` with `args`; its outcome and what it printed to stdout."""
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
        outcome = {"code": 0, "message": ""}
    except SystemExit as stop:
        code = stop.code
        outcome = {"code": code if isinstance(code, int) else 1, "message": "" if code is None else str(code)}
    except BaseException as error:  # KeyboardInterrupt too: a prelude raises it to stand for a killed run
        outcome = {"code": "raised", "message": type(error).__name__ + ": " + traceback.format_exc()[-2000:]}
    finally:
        sys.path.pop(0)
    return {**outcome, "stdout": printed.getvalue()}


def main(argv: Sequence[str]) -> None:
    """Call the prelude, then run every command, writing the report after each."""
    commands, report, *prelude = argv
    if prelude and prelude[0]:
        load_function(prelude[0])()
    outcomes = []
    for script, cwd, args in json.loads(commands):
        outcomes.append(run_command(script, cwd, args))
        with open(report, "w") as handle:
            json.dump(outcomes, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
