"""`python -m petl_modules.flatten`: one self-contained file that plain HyperPyYAML loads, and the errors of
composition (broken `extends:` entries, booleans that receive something else)."""

from __future__ import annotations

import shutil
from io import StringIO
from pathlib import Path

import pytest
from hyperpyyaml import load_hyperpyyaml
from tiny_models import write_checkpoints

from petl_modules.flatten import flatten
from petl_modules.flatten import main as flatten_main
from petl_modules.hparams_loader import HparamsError, load_hparams

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILE = REPO / "recipes" / "GSC" / "hparams" / "soft_moa.yaml"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def tiny_options(checkpoints, tmp_path) -> list[str]:
    return [
        f"--backbone_source={checkpoints['ast']}",
        "--target_length=50",
        "--num_adapters=3",
        f"--data_folder={tmp_path / 'data'}",
        f"--output_folder={tmp_path / 'out'}",
        "--train_dataloader_options={batch_size: 4}",
    ]


def test_plain_hyperpyyaml_loads_the_flat_file_as_load_hparams_loads_the_recipe(checkpoints, tmp_path, capsys):
    options = tiny_options(checkpoints, tmp_path)
    assert flatten_main([str(RECIPE_FILE), *options]) == 0
    text = capsys.readouterr().out
    assert "extends:" not in text and text.startswith("# Flattened from")
    flat = load_hyperpyyaml(StringIO(text))  # plain HyperPyYAML, no overrides
    overrides = "\n".join(option[2:].replace("=", ": ", 1) for option in options)
    composed = load_hparams(RECIPE_FILE, overrides)
    assert flat["model"].trainable_parameter_groups() == composed["model"].trainable_parameter_groups()
    assert flat["model"].method.num_adapters == 3 and flat["num_classes"] == 35  # the GSC block
    # the nested override merged as HyperPyYAML merges it: the sibling key stays
    assert flat["train_dataloader_options"] == {"batch_size": 4, "num_workers": 2}
    assert flat["test_dataloader_options"] == {"batch_size": 128, "num_workers": 2}
    assert flat["save_folder"] == str(tmp_path / "out" / "save")


def test_flat_file_keeps_the_placeholders_when_not_given(tmp_path):
    text = flatten(str(RECIPE_FILE))
    assert "data_folder: !PLACEHOLDER" in text and "output_folder: !PLACEHOLDER" in text
    with pytest.raises(ValueError, match="data_folder"):
        load_hyperpyyaml(StringIO(text))


def test_a_copied_recipe_file_names_its_broken_extends_entry(tmp_path, capsys):
    copy = tmp_path / "my_lora.yaml"
    shutil.copy(REPO / "recipes" / "GSC" / "hparams" / "lora.yaml", copy)
    with pytest.raises(HparamsError) as error:
        load_hparams(copy)
    message = str(error.value)
    assert message.startswith(f"{copy}: extends entry '../../../petl_modules/hparams/methods/lora.yaml' not found")
    assert flatten_main([str(copy)]) == 2
    assert capsys.readouterr().err.strip() == f"flatten: error: {message}"


def test_a_boolean_set_to_a_string_in_a_file_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("spec_augment: False\nlr: 0.1\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\nspec_augment: no\n")
    with pytest.raises(
        HparamsError, match=r"run\.yaml: spec_augment must be a YAML boolean \(True or False\), got 'no'"
    ):
        load_hparams(tmp_path / "run.yaml")
    (tmp_path / "ok.yaml").write_text("extends: base.yaml\nspec_augment: True\n")
    assert load_hparams(tmp_path / "ok.yaml", "spec_augment: False") == {"spec_augment": False, "lr": 0.1}
    with pytest.raises(HparamsError, match=r"--spec_augment must be a YAML boolean .* got 'off'"):
        load_hparams(tmp_path / "ok.yaml", "spec_augment: off")
    (tmp_path / "nested.yaml").write_text("options:\n    shuffle: False\n    size: 2\n")
    assert load_hparams(tmp_path / "nested.yaml", "options: {size: 3}") == {"options": {"shuffle": False, "size": 3}}
    with pytest.raises(HparamsError, match=r"--options\.shuffle must be a YAML boolean"):
        load_hparams(tmp_path / "nested.yaml", "options: {shuffle: 'yes'}")
