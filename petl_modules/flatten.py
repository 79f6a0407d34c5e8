"""One self-contained HyperPyYAML file from a recipe's (or any) hyperparameter file and its `extends:`.

    python -m petl_modules.flatten RECIPE_YAML [--key=value ...] > my.yaml

The output has no `extends:`: plain `hyperpyyaml.load_hyperpyyaml` loads it (give the `!PLACEHOLDER` keys,
`data_folder` and `output_folder`, as overrides or on this command line), and `recipes/<DS>/train.py my.yaml`
runs it unchanged. Overrides are merged as HyperPyYAML merges them, checked as the recipes check them
(known keys, booleans stay booleans).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .hparams_loader import HparamsError, compose_tree, dump_tree

USAGE = "usage: python -m petl_modules.flatten HPARAMS.yaml [--key=value ...] > flat.yaml"


def parse_command_line(argv: Sequence[str]) -> tuple[str, str]:
    """HPARAMS.yaml and the `--key=value` options as SpeechBrain's YAML override text."""
    files = [arg for arg in argv if not arg.startswith("--")]
    if len(files) != 1:
        raise HparamsError(USAGE)
    lines = []
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise HparamsError(f"option {arg} needs a value: --{key}=VALUE")
            lines.append(f"{key}: {value}")
    return files[0], "\n".join(lines)


def flatten(path: str, overrides: str = "") -> str:
    """The YAML text of `path` with everything it extends and the overrides merged."""
    tree = compose_tree(path, overrides)
    header = f"Flattened from {path} by `python -m petl_modules.flatten`"
    if overrides:
        header += " with " + " ".join(f"--{line.replace(': ', '=', 1)}" for line in overrides.splitlines())
    header += (
        ".\nSelf-contained: hyperpyyaml.load_hyperpyyaml loads it; HyperPyYAML runs code, load trusted files only."
    )
    return dump_tree(tree, header)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        path, overrides = parse_command_line(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.write(flatten(path, overrides))
    except HparamsError as error:
        print(f"flatten: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
