"""Command lines of the recipes, for the tools that run them (demo, recipe timing, tests).

    recipe_command("GSC", "lora", {"data_folder": data, "batch_size": 8}, "--noprogressbar")
    -> [python, <repo>/recipes/GSC/train.py, <repo>/recipes/GSC/hparams/lora.yaml,
        --data_folder=<data>, --batch_size=8, --noprogressbar]

Settings become `--key=value` options, then the extra options follow as given; when an option is given more
than once only its last occurrence is kept, so a caller's extra option replaces a default setting.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = REPO_ROOT / "recipes"


def train_script(dataset: str) -> Path:
    """`recipes/<dataset>/train.py` of this checkout."""
    return RECIPES / dataset / "train.py"


def method_hparams(dataset: str, method: str) -> Path:
    """`recipes/<dataset>/hparams/<method>.yaml` of this checkout."""
    return RECIPES / dataset / "hparams" / f"{method}.yaml"


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
) -> list[str]:
    """`python recipes/<dataset>/train.py <hparams> --key=value ... extra...` (hparams: the method's file)."""
    hparams_file = hparams or method_hparams(dataset, method)
    return [sys.executable, str(train_script(dataset)), str(hparams_file), *recipe_options(settings, *extra)]
