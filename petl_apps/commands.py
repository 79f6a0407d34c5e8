"""Command lines of the recipes, for the applications that run them (demo, sweep, recipe timing) and the tests.

    recipe_command("GSC", "lora", {"data_folder": data, "batch_size": 8}, "--noprogressbar")
    -> [python, recipes/GSC/train.py, recipes/GSC/hparams/lora.yaml,
        --data_folder=<data>, --batch_size=8, --noprogressbar]

The recipes are found in an explicit folder (`recipes=`, the applications' `--recipes DIR`), by default
`recipes/` under the current directory: nothing here knows where this package is installed or checked out.
Settings become `--key=value` options, then the extra options follow as given; when an option is given more than
once only its last occurrence is kept, so a caller's extra option replaces a default setting.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

DEFAULT_RECIPES = Path("recipes")


class RecipesNotFoundError(ValueError):
    """The recipes folder or one of its recipes is not there; the message names the path and the fix."""


def recipes_folder(recipes: str | Path | None = None) -> Path:
    """`recipes` (as given: a relative folder stays relative to the current directory), else `recipes/`."""
    folder = Path(recipes) if recipes is not None else DEFAULT_RECIPES
    if not folder.is_dir():
        raise RecipesNotFoundError(
            f"recipes folder {folder.absolute()} not found; run from the repository root or give --recipes DIR"
        )
    return folder


def train_script(dataset: str, recipes: str | Path | None = None) -> Path:
    """`<recipes>/<dataset>/train.py`."""
    script = recipes_folder(recipes) / dataset / "train.py"
    if not script.is_file():
        raise RecipesNotFoundError(f"no recipe {dataset!r}: {script.absolute()} not found")
    return script


def method_hparams(dataset: str, method: str, recipes: str | Path | None = None) -> Path:
    """`<recipes>/<dataset>/hparams/<method>.yaml`."""
    return recipes_folder(recipes) / dataset / "hparams" / f"{method}.yaml"


def _option_name(option: str) -> str:
    return option.split("=", 1)[0]


def recipe_options(settings: Mapping[str, object] | None = None, *extra: str) -> list[str]:
    """`--key=value` for each setting, then `extra`; an option given twice keeps its last occurrence only."""
    options = [f"--{key}={value}" for key, value in (settings or {}).items()] + list(extra)
    last = {_option_name(option): index for index, option in enumerate(options)}
    return [option for index, option in enumerate(options) if last[_option_name(option)] == index]


def recipe_command(
    dataset: str,
    method: str,
    settings: Mapping[str, object] | None = None,
    *extra: str,
    hparams: str | Path | None = None,
    recipes: str | Path | None = None,
) -> list[str]:
    """`python <recipes>/<dataset>/train.py <hparams> --key=value ... extra...` (hparams: the method's file)."""
    hparams_file = hparams or method_hparams(dataset, method, recipes)
    script = train_script(dataset, recipes)
    return [sys.executable, str(script), str(hparams_file), *recipe_options(settings, *extra)]
