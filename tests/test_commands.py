"""The recipes' command lines as the demo, the recipe timing and the tests build them."""

from __future__ import annotations

import sys
from pathlib import Path

from petl_modules.commands import recipe_command

REPO = Path(__file__).resolve().parent.parent


def test_settings_become_options_and_a_later_option_replaces_an_earlier_one():
    command = recipe_command("GSC", "lora", {"lr": 0.1, "data_folder": Path("/data")}, "--lr=0.2", "--noprogressbar")
    assert command == [
        sys.executable,
        str(REPO / "recipes" / "GSC" / "train.py"),
        str(REPO / "recipes" / "GSC" / "hparams" / "lora.yaml"),
        "--data_folder=/data",
        "--lr=0.2",
        "--noprogressbar",
    ]
    assert all(Path(part).is_file() for part in command[1:3])


def test_an_own_hparams_file_replaces_the_methods():
    assert recipe_command("ESC50", "linear", None, hparams="mine.yaml")[2:] == ["mine.yaml"]
