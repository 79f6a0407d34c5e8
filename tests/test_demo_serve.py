"""`make serve` (`petl_apps.demo_serve`): what it says without the demo, and which runs it hands the server."""

from __future__ import annotations

import json

import pytest

from petl_apps import demo_serve
from petl_modules import serve


@pytest.fixture
def served(monkeypatch):
    """The argument lists `petl_modules.serve.main` was called with (the server never starts)."""
    calls = []
    monkeypatch.setattr(serve, "main", calls.append)
    return calls


def demo_like_output(output, rows, noise=True):
    """An output folder as the demo leaves it: `demo_results.json`, a run folder per row, the noise run."""
    (output / "demo_results.json").parent.mkdir(parents=True, exist_ok=True)
    (output / "demo_results.json").write_text(json.dumps(rows))
    folders = [output / "runs" / row["method"] for row in rows] + ([output / "noise_runs" / "lora"] if noise else [])
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "results.json").write_text("{}")


def row(method, valid, trainable):
    return {"method": method, "trainable_params": trainable, "valid_accuracy": valid, "test_accuracy": 0.5}


ROWS = [
    row("linear_random_init", 0.99, 1_546),  # best valid, but random weights: another backbone
    row("full_ft", 0.98, 834_186),  # trains the backbone: cannot share it
    row("linear", 0.79, 1_546),
    row("conformer_adapter", 0.82, 16_934),
    row("soft_moa", 0.82, 5_786),  # ties conformer_adapter on valid with fewer parameters (and a later name)
    row("lora", 0.78, 5_642),
]


def test_without_the_demo_it_says_run_make_demo_first(tmp_path, served, capsys):
    assert demo_serve.main([f"--output_folder={tmp_path / 'nothing'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run make demo first" in err[0] and "demo_results.json" in err[0]
    assert served == []


def test_it_serves_the_best_shared_words_run_and_the_noise_run(tmp_path, served, capsys):
    demo_like_output(tmp_path, ROWS)
    assert demo_serve.main([f"--output_folder={tmp_path}", "--port", "8123", "--host", "0.0.0.0"]) == 0
    words, noise = tmp_path / "runs" / "soft_moa", tmp_path / "noise_runs" / "lora"
    assert served == [["--task", f"words={words}", "--task", f"noise={noise}", "--port", "8123", "--host", "0.0.0.0"]]
    out = capsys.readouterr().out
    assert f"words: {words} (soft_moa, valid accuracy 0.820)" in out and f"noise: {noise}" in out


@pytest.mark.parametrize(
    ("rows", "noise", "missing"),
    [
        (ROWS, False, "no noise run in {output}/noise_runs/lora (results.json not found)"),
        (ROWS[:2], True, "no words run shares the backbone (only full_ft, linear_random_init)"),
    ],
    ids=["noise run", "shared words run"],
)
def test_a_missing_run_is_named(tmp_path, served, capsys, rows, noise, missing):
    demo_like_output(tmp_path, rows, noise=noise)
    assert demo_serve.main([f"--output_folder={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert missing.format(output=tmp_path) in err and "run make demo first" in err and served == []


def test_a_words_run_listed_but_removed_is_named(tmp_path, served, capsys):
    demo_like_output(tmp_path, ROWS)
    (tmp_path / "runs" / "soft_moa" / "results.json").unlink()
    assert demo_serve.main([f"--output_folder={tmp_path}"]) == 1
    assert f"no words run in {tmp_path}/runs/soft_moa" in capsys.readouterr().err and served == []
