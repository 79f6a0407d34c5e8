"""The library and its applications installed with `pip install .` (not editable) into a fresh virtual
environment, run from a working directory outside the checkout: a recipe run, `summary`, `classify`, `export`,
`report`, `sweep --print` and an old command name. Nothing may come from the checkout's Python files."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_helpers import QUICK_OPTIONS, RECIPES, REPO

from petl_apps.synthetic import make_gsc
from petl_modules.random_backbones import write_random_checkpoint

SOURCES = ("petl_modules", "petl_apps", "pyproject.toml", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding this project (installed from a copy of its sources) and the test environment's own
    packages (torch, SpeechBrain, ...) through a .pth file; returns (its python, the environment to run it in)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(
            REPO / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source)]
    done = subprocess.run(install, capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return python, env


def run(python: Path, env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(python), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_the_installed_package_runs_the_recipes_and_tools_from_elsewhere(installed, tmp_path):
    python, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        python, env, work, "-c", "import petl_modules, petl_apps; print(petl_modules.__file__, petl_apps.__file__)"
    )
    assert all(not path.startswith(str(REPO)) and "site-packages" in path for path in where.stdout.split())

    data = make_gsc(tmp_path / "data", num_words=4, n_per_class=2)
    ast = write_random_checkpoint("ast", tmp_path / "ast")
    out = tmp_path / "run"
    trained = run(
        python, env, work, str(RECIPES / "GSC" / "train.py"), "hparams/lora.yaml",  # found in the recipe's folder
        f"--data_folder={data}", f"--output_folder={out}", f"--backbone_source={ast}", "--num_classes=4",
        *QUICK_OPTIONS,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert trained.stdout.strip().splitlines()[-1].startswith("GSC lora: test accuracy ")
    assert results["method"] == "lora" and results["git_revision"]  # the revision of the recipe's checkout

    summary = run(python, env, work, "-m", "petl_apps.summary", str(RECIPES / "GSC/hparams/lora.yaml"),
                  f"--backbone_source={ast}", "--json")  # fmt: skip
    assert json.loads(summary.stdout)["method"] == "lora"
    clip = next((data / "yes").glob("*.wav"))
    classified = run(python, env, work, "-m", "petl_modules.classify", "--run", str(out), str(clip), "--json")
    assert json.loads(classified.stdout)[0]["label"] in results["folds"]["official"]["classes"]
    run(python, env, work, "-m", "petl_modules.export", "--run", str(out), "--out", "exported")
    assert (work / "exported" / "trained.safetensors").is_file()
    run(python, env, work, "-m", "petl_apps.report", str(out), "--out", "report")
    assert "lora" in (work / "report" / "report.md").read_text()
    plan = run(python, env, work, "-m", "petl_apps.sweep", "--datasets=GSC", "--methods=lora", "--data_root=/d",
               f"--recipes={RECIPES}", "--print")  # fmt: skip
    assert plan.stdout.splitlines()[0].startswith(f"python {RECIPES}/GSC/train.py {RECIPES}/GSC/hparams/lora.yaml ")
    old_name = run(python, env, work, "-m", "petl_modules.report", "--help")  # the name before petl_apps
    assert old_name.stdout.startswith("usage: python -m petl_apps.report")


def test_every_old_command_name_runs_its_new_module():
    """`python -m petl_modules.<old name>` finds the file of the module that replaced it (`aliases.ALIASES`)."""
    import importlib.util

    from petl_modules.aliases import ALIASES

    assert set(ALIASES) == {
        *(f"petl_modules.{name}" for name in ("benchmark", "demo", "pretrain", "recipe_timing", "report", "summary")),
        "petl_modules.sweep",
        "petl_modules.checkpoints",
    }
    for old, new in ALIASES.items():
        assert importlib.util.find_spec(old).origin == importlib.util.find_spec(new).origin
    assert importlib.util.find_spec("petl_modules.checkpoints").origin.endswith("petl_modules/random_backbones.py")
