"""Every file and folder the tools write follows the umask: files 0666 & ~umask, folders 0777 & ~umask.

On a shared cluster a colleague reads what the umask lets them read. Libraries that write
privately (safetensors' 0600 temporary file renamed into place, `tempfile.mkdtemp`'s 0700 folder) must not
leave their modes on an output. Each test runs under umask 022 and 077, set in-process and restored after.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from test_pretrain import TINY
from trained_runs import trained_run

from petl_apps.pretrain import pretrain
from petl_modules import export
from petl_modules.atomic import atomic_path, write_json_atomic
from petl_modules.data.feature_cache import FeatureCache
from petl_modules.inference import save_trainable
from petl_modules.random_backbones import write_random_checkpoint

UMASKS = (0o022, 0o077)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Trained before any umask fixture runs (module scope), under the session's own umask."""
    return trained_run(tmp_path_factory, "lora")


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    """The process umask for one test (process-wide: always set back)."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def off_the_umask(root: Path, umask: int) -> list[str]:
    """Each path at or under `root` whose mode is not what `open` (files) or `mkdir` (folders) give."""
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        expected = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~umask
        if mode & 0o777 != expected:  # permission bits only: a set-group-ID temporary folder passes on its bit
            wrong.append(f"{path.relative_to(root.parent)}: {mode & 0o777:o}, not {expected:o}")
    return wrong


def only_child(parent: Path) -> Path:
    """The one entry of `parent`: staging folders and temporary files are gone."""
    entries = list(parent.iterdir())
    assert len(entries) == 1, entries
    return entries[0]


@pytest.mark.parametrize("form", ["speechbrain", "peft", "merge"])
def test_export_follows_the_umask(lora_run, umask, tmp_path, form):
    options = {"speechbrain": [], "peft": ["--format", "peft"], "merge": ["--merge"]}[form]
    out = tmp_path / "exports" / "lora"
    export.main(["--run", str(lora_run), "--out", str(out), *options])
    assert only_child(out.parent) == out
    safetensors = {path.name for path in out.rglob("*.safetensors")}
    assert "trained.safetensors" in safetensors
    assert form != "peft" or {"adapter_model.safetensors", "position_embeddings.safetensors"} <= safetensors
    assert form != "merge" or (out / "backbone" / "model.safetensors").is_file()
    assert off_the_umask(out.parent, umask) == []


@pytest.mark.parametrize("kind", ["ast", "wav2vec2"])
def test_random_checkpoint_follows_the_umask(umask, tmp_path, kind):
    folder = write_random_checkpoint(kind, tmp_path / "backbones" / kind)
    assert only_child(folder.parent) == folder
    assert (folder / "model.safetensors").is_file()
    assert off_the_umask(folder.parent, umask) == []


def test_random_checkpoint_into_an_existing_folder_follows_the_umask(umask, tmp_path):
    folder = tmp_path / "ast"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    write_random_checkpoint("ast", folder)
    assert only_child(tmp_path) == folder
    assert sorted(path.name for path in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.txt",
        "preprocessor_config.json",
    ]
    assert off_the_umask(folder, umask) == []


def test_pretraining_follows_the_umask(umask, tmp_path):
    folder = pretrain(tmp_path / "pretrained" / "ast", TINY, progress=False)
    assert only_child(folder.parent) == folder
    assert off_the_umask(folder.parent, umask) == []


def test_atomic_writes_and_feature_caches_follow_the_umask(umask, tmp_path):
    out = tmp_path / "out"
    save_trainable({"weight": torch.ones(2, 3)}, out / "trained.safetensors")
    with atomic_path(out / "private.safetensors") as tmp:  # safetensors replaces `tmp` by a 0600 file
        save_file({"weight": torch.ones(2)}, str(tmp))
    write_json_atomic(out / "deep" / "info.json", {"a": 1})
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    cache = FeatureCache(out / "features", extract=lambda wave: wave * 2, settings={"scale": 2})
    assert torch.equal(cache(wav), torch.zeros(1600))
    assert len(list(cache.folder.glob("*.pt"))) == 1
    assert off_the_umask(out, umask) == []
