"""The recipes' command lines as the demo, the sweep, the recipe timing and the tests build them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from petl_apps.commands import RecipesNotFoundError, recipe_command

REPO = Path(__file__).resolve().parent.parent


def test_settings_become_options_and_a_later_option_replaces_an_earlier_one():
    command = recipe_command(
        "GSC",
        "lora",
        {"lr": 0.1, "data_folder": Path("/data")},
        "--lr=0.2",
        "--noprogressbar",
        recipes=REPO / "recipes",
    )
    assert command == [
        sys.executable,
        f"{REPO}/recipes/GSC/train.py",
        f"{REPO}/recipes/GSC/hparams/lora.yaml",
        "--data_folder=/data",
        "--lr=0.2",
        "--noprogressbar",
    ]


def test_the_recipes_are_found_under_the_current_directory_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert recipe_command("GSC", "lora")[1:] == ["recipes/GSC/train.py", "recipes/GSC/hparams/lora.yaml"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipesNotFoundError, match=f"recipes folder {tmp_path}/recipes not found; .* --recipes DIR"):
        recipe_command("GSC", "lora")
    with pytest.raises(RecipesNotFoundError, match=f"no recipe 'GCS': {REPO}/recipes/GCS/train.py not found"):
        recipe_command("GCS", "lora", recipes=REPO / "recipes")


def test_an_own_hparams_file_replaces_the_methods():
    assert recipe_command("ESC50", "linear", None, hparams="mine.yaml", recipes=REPO / "recipes")[2:] == ["mine.yaml"]
