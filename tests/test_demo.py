"""The quick-start demo runs end to end, writes its table and reuses finished runs."""

from __future__ import annotations

from petl_modules.demo import main


def test_demo_compares_methods_and_reuses_finished_runs(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main([f"--output_folder={output}", "--methods=linear,lora", "--epochs=1"]) == 0
    table = (output / "results.md").read_text()
    assert "| linear | 262 |" in table
    assert "| lora | 518 |" in table
    assert (output / "runs" / "lora" / "results.json").is_file()
    first = (output / "runs" / "lora" / "fold_result.json").stat().st_mtime_ns

    assert main([f"--output_folder={output}", "--methods=linear,lora", "--epochs=1"]) == 0
    assert (output / "runs" / "lora" / "fold_result.json").stat().st_mtime_ns == first
    assert "| method | trainable params |" in capsys.readouterr().out


def test_demo_names_an_unknown_method(tmp_path, capsys):
    assert main([f"--output_folder={tmp_path}", "--methods=lorra", "--epochs=1"]) == 1
    assert "lorra.yaml" in capsys.readouterr().err
