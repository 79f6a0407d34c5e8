"""`python -m petl_apps.sweep`: the exact command list, `--methods all`, the skip logic, one-line errors,
and one real tiny run through the sweep (then skipped when rerun) that ends with the report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from recipe_helpers import REPO, TARGET_LENGTH

from petl_apps.sweep import main
from petl_apps.synthetic import make_gsc
from petl_modules.random_backbones import write_random_checkpoint

OFFICIAL = {
    "FSC": "fluent_speech_commands_dataset",
    "ESC50": "ESC-50-master",
    "UrbanSound8K": "UrbanSound8K",
    "GSC": "speech_commands_v0.02",
    "IEMOCAP": "IEMOCAP_full_release",
}


def sweep(*argv: str) -> tuple[int, list[str]]:
    stream = io.StringIO()
    code = main(list(argv), stream=stream)
    return code, stream.getvalue().splitlines()


def test_print_lists_the_expected_commands(tmp_path):
    out = tmp_path / "out"
    code, lines = sweep(
        "--datasets=FSC,ESC50",
        "--methods=lora,linear",
        "--data_root=/data",
        "--data_folder=ESC50=/elsewhere/esc",
        "--backbone=wav2vec2",
        "--backbone_source=facebook/wav2vec2-base",
        "--seeds=1,2",
        "--few_shot_samples=full,4",
        f"--output_folder={out}",
        "--print",
        "--",
        "--number_of_epochs=3",
        "--device=cuda",
    )
    expected = []
    for dataset, data in (("FSC", "/data/fluent_speech_commands_dataset"), ("ESC50", "/elsewhere/esc")):
        for method in ("lora", "linear"):
            for seed in (1, 2):
                for shots in ("", "4"):
                    folder = f"{out}/{dataset}/{method}/seed{seed}" + (f"/fewshot{shots}" if shots else "")
                    expected.append(
                        f"python recipes/{dataset}/train.py recipes/{dataset}/hparams/{method}.yaml "
                        f"--data_folder={data} --output_folder={folder} --backbone=wav2vec2 "
                        f"--backbone_source=facebook/wav2vec2-base --seed={seed}"
                        + (f" --few_shot_samples={shots}" if shots else "")
                        + " --number_of_epochs=3 --device=cuda"
                    )
    expected.append(f"python -m petl_apps.report {out} --out {out}/report")
    assert code == 0 and lines == expected


@pytest.mark.parametrize("dataset", list(OFFICIAL))
def test_methods_all_is_every_method_file_of_the_recipe(tmp_path, dataset):
    code, lines = sweep(f"--datasets={dataset}", "--data_root=/d", f"--output_folder={tmp_path}", "--print")
    files = sorted(p.stem for p in (REPO / "recipes" / dataset / "hparams").glob("*.yaml"))
    methods = [m for m in files if m != dataset.lower()]  # the dataset block is named after the dataset
    assert code == 0 and "linear" in methods and "soft_moa" in methods
    assert [line.split()[2] for line in lines[:-1]] == [f"recipes/{dataset}/hparams/{m}.yaml" for m in methods]
    assert all(f"--data_folder=/d/{OFFICIAL[dataset]} " in line for line in lines[:-1])
    assert all(f"--output_folder={tmp_path}/{dataset}/{m}/seed10 " in line for line, m in zip(lines, methods))


def write_results(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    results = {"dataset": "ESC50", "method": "lora", "backbone": "ast", "debug": False, "folds_missing": []}
    (folder / "results.json").write_text(json.dumps({**results, **fields}))


def test_finished_runs_are_skipped(tmp_path):
    base = ["--datasets=ESC50", "--methods=lora", "--data_root=/d", "--seeds=1,2,3,4,5", f"--output_folder={tmp_path}"]
    write_results(tmp_path / "ESC50/lora/seed1")  # finished
    write_results(tmp_path / "ESC50/lora/seed2", folds_missing=["4", "5"])  # partial: rerun finishes it
    write_results(tmp_path / "ESC50/lora/seed3", debug=True)  # debug runs never count
    (tmp_path / "ESC50/lora/seed4").mkdir(parents=True)
    (tmp_path / "ESC50/lora/seed4/results.json").write_text("{half a fi")  # unreadable
    code, lines = sweep(*base, "--print")
    assert code == 0
    assert [line.split("--output_folder=")[1].split()[0] for line in lines[:-1]] == [
        f"{tmp_path}/ESC50/lora/seed{s}" for s in (2, 3, 4, 5)
    ]


D = "--data_root=/d"
ERRORS = {
    "unknown dataset": ([D, "--datasets=ESC-50"], r"--datasets: no recipe 'ESC-50'; recipes are .*ESC50"),
    "unknown method": ([D, "--datasets=GSC", "--methods=lora,loraa"], r"--methods: GSC has no method 'loraa'"),
    "bad seeds": ([D, "--datasets=GSC", "--seeds=1,x"], r"--seeds: expected a comma-separated list of integers"),
    "bad few-shot": (
        [D, "--datasets=GSC", "--few_shot_samples=0"],
        r"--few_shot_samples: expected a comma-separated list of positive integers or 'full', got '0'",
    ),
    "own option after --": ([D, "--datasets=GSC", "--", "--seed=3"], r"the sweep sets --seed itself"),
    "bad data_folder": ([D, "--datasets=GSC", "--data_folder=GSC"], r"--data_folder: expected DATASET=DIR"),
    "no data root": (["--datasets=GSC"], r"--data_root DIR \(or --data_folder GSC=DIR\) is required"),
}


def check_one_line_error(tmp_path, capsys, argv: list[str], message: str) -> None:
    """The sweep with `argv` (a `--print` run into `tmp_path`) exits 1 with one line matching `message`."""
    split = argv.index("--") if "--" in argv else len(argv)
    code, _ = sweep(*argv[:split], f"--output_folder={tmp_path}", "--print", *argv[split:])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and error.startswith("sweep: error: "), error
    assert re.search(message, error.strip()), error


@pytest.mark.parametrize("case", list(ERRORS))
def test_one_line_errors(tmp_path, capsys, case):
    check_one_line_error(tmp_path, capsys, *ERRORS[case])


def test_another_backbone_in_the_folder_stops(tmp_path, capsys):
    write_results(tmp_path / "GSC/lora/seed10", backbone="wav2vec2")
    code, _ = sweep("--datasets=GSC", "--methods=lora", "--data_root=/d", f"--output_folder={tmp_path}", "--print")
    assert code == 1 and "records a wav2vec2 run, not ast; give another --output_folder" in capsys.readouterr().err


def test_missing_data_folder_stops_before_any_run(tmp_path, capsys):
    code, _ = sweep("--datasets=GSC", "--methods=lora", f"--data_root={tmp_path}", f"--output_folder={tmp_path}")
    assert code == 1 and f"GSC data folder {tmp_path}/speech_commands_v0.02 not found" in capsys.readouterr().err


def test_a_real_tiny_sweep_then_skipped(tmp_path):
    make_gsc(tmp_path / "data", num_words=4, n_per_class=2)
    ast = write_random_checkpoint("ast", tmp_path / "ast")
    out = tmp_path / "out"
    argv = ["--datasets=GSC", "--methods=linear", f"--data_root={tmp_path / 'data'}", f"--backbone_source={ast}"]
    argv += ["--seeds=1", f"--output_folder={out}", "--", "--num_classes=4", f"--target_length={TARGET_LENGTH}"]
    argv += ["--number_of_epochs=1", "--batch_size=4", "--num_workers=0", "--device=cpu", "--noprogressbar"]
    code, lines = sweep(*argv)
    run = out / "GSC/linear/seed1"
    assert code == 0, (run / "sweep.log").read_text()
    results = json.loads((run / "results.json").read_text())
    assert (results["dataset"], results["method"], results["seed"]) == ("GSC", "linear", 1)
    accuracy = results["mean"]["test"]["accuracy"]
    assert lines[0].startswith(f"[1/1] GSC linear seed1: running (log {run}/sweep.log) ... done in ")
    assert lines[0].endswith(f" s, test accuracy {100 * accuracy:.2f} %")
    assert lines[1] == f"report: {out}/report/report.md"
    assert f"| GSC | ast | linear | {100 * accuracy:.2f} ± 0.00 |" in (out / "report/report.md").read_text()
    stamp = (run / "results.json").stat().st_mtime_ns
    code, lines = sweep(*argv)
    assert code == 0 and lines[0] == "[1/1] GSC linear seed1: finished before, skipped"
    assert (run / "results.json").stat().st_mtime_ns == stamp
