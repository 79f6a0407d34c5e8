"""`python -m petl_apps.sweep` with `--paper`, `--grid` and `--slurm`, by content: the exact runs of the paper's
Tables 1-3, grid products and their folders, one-line errors, the fold declarations read from the recipes, and
the files of a SLURM job array (its tasks run under plain bash, submit.sh against a stand-in sbatch). The array's
lines run real recipes in test_sweep_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_helpers import REPO
from test_sweep import OFFICIAL, check_one_line_error, sweep

from petl_apps.sweep import recipe_folds, write_slurm

# The paper's rows, in its order (typed here again, not read from petl_apps.paper).
TABLE1 = [
    "full_ft",
    "linear",
    "bitfit",
    "spt300",
    "dpt25",
    "prefix24",
    "lora",
    "bottleneck_pfeiffer",
    "bottleneck_houlsby",
    "conformer_pfeiffer",
    "conformer_houlsby",
]
TABLE2 = ["dpt25", "lora", "bottleneck_pfeiffer", "conformer_pfeiffer"]
TABLE2_K = {"ESC50": [1, 2, 4, 8], "GSC": [2, 8, 32, 64]}
TABLE3 = ["wav2vec2_full_ft", "wav2vec2_linear", "wav2vec2_bottleneck", "wav2vec2_conformer"]
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes are found as recipes/ under the current directory


def command(dataset: str, preset: str, out: Path, seed: int = 10, k: int | None = None, root: str = "/d") -> str:
    folder = f"{out}/{dataset}/paper/{preset}/seed{seed}" + (f"/fewshot{k}" if k else "")
    return (
        f"python recipes/{dataset}/train.py recipes/{dataset}/hparams/paper/{preset}.yaml "
        f"--data_folder={root}/{OFFICIAL[dataset]} --output_folder={folder} --seed={seed}"
        + (f" --few_shot_samples={k}" if k else "")
    )


def report(out: Path) -> str:
    return f"python -m petl_apps.report {out} --out {out}/report"


def test_paper_table1_lists_its_44_runs_then_the_report(tmp_path):
    out = tmp_path / "out"
    code, lines = sweep("--paper", "table1", "--print", "--data_root", "/d", f"--output_folder={out}")
    datasets = ["ESC50", "UrbanSound8K", "GSC", "FSC"]
    expected = [command(dataset, preset, out) for dataset in datasets for preset in TABLE1]
    assert code == 0 and len(expected) == 44
    assert lines == [*expected, report(out)]
    assert all((REPO / line.split()[2]).is_file() for line in lines[:-1])  # every preset file exists


def test_paper_table2_runs_each_k_of_its_datasets(tmp_path):
    out = tmp_path / "out"
    code, lines = sweep("--paper=table2", "--print", "--data_root=/d", f"--output_folder={out}", "--seeds=1,2")
    expected = [
        command(dataset, preset, out, seed, k)
        for dataset in ("ESC50", "GSC")
        for preset in TABLE2
        for seed in (1, 2)
        for k in TABLE2_K[dataset]
    ]
    assert code == 0 and len(expected) == 64 and lines == [*expected, report(out)]


def test_paper_table3_runs_the_wav2vec2_presets(tmp_path):
    out = tmp_path / "out"
    argv = ["--paper=table3", "--print", "--data_root=/d", f"--output_folder={out}", "--backbone=wav2vec2"]
    code, lines = sweep(*argv, "--", "--device=cuda")
    expected = [
        command(dataset, preset, out).replace(" --seed=", " --backbone=wav2vec2 --seed=") + " --device=cuda"
        for dataset in ("GSC", "FSC", "IEMOCAP")
        for preset in TABLE3
    ]
    assert code == 0 and lines == [*expected, report(out)]


def test_paper_subsets_keep_the_papers_order(tmp_path):
    out = tmp_path / "out"
    argv = ["--paper=table1", "--datasets=FSC,GSC", "--methods=lora,dpt25", "--data_root=/d", f"--output_folder={out}"]
    code, lines = sweep(*argv, "--print")
    expected = [command(d, p, out) for d in ("FSC", "GSC") for p in ("dpt25", "lora")]
    assert code == 0 and lines == [*expected, report(out)]


def write_results(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    results = {"dataset": "GSC", "method": "lora", "backbone": "ast", "debug": False, "folds_missing": []}
    (folder / "results.json").write_text(json.dumps({**results, **fields}))


def test_paper_runs_check_the_tables_backbone(tmp_path, capsys):
    base = ["--paper=table3", "--datasets=GSC", "--methods=wav2vec2_linear", "--data_root=/d", "--print"]
    write_results(tmp_path / "GSC/paper/wav2vec2_linear/seed10", backbone="wav2vec2")  # finished: skipped
    code, lines = sweep(*base, f"--output_folder={tmp_path}")
    assert code == 0 and lines == [report(tmp_path)]
    write_results(tmp_path / "GSC/paper/wav2vec2_linear/seed10", backbone="ast")
    code, _ = sweep(*base, f"--output_folder={tmp_path}")
    assert code == 1 and "records a ast run, not wav2vec2; give another --output_folder" in capsys.readouterr().err


def test_grid_repeats_every_run_for_each_value(tmp_path):
    out = tmp_path / "out"
    base = ["--datasets=GSC", "--methods=conformer_adapter", "--data_root=/d", f"--output_folder={out}", "--print"]
    code, lines = sweep(*base, "--grid", "kernel_size=1,3,8,15,31", "--", "--device=cuda")
    data = "--data_folder=/d/speech_commands_v0.02"
    expected = [
        f"python recipes/GSC/train.py recipes/GSC/hparams/conformer_adapter.yaml {data} "
        f"--output_folder={out}/GSC/conformer_adapter/kernel_size-{k}/seed10 --seed=10 --kernel_size={k} --device=cuda"
        for k in (1, 3, 8, 15, 31)
    ]
    assert code == 0 and lines == [*expected, report(out)]


def test_grids_give_their_product_with_and_without_paper(tmp_path):
    out = tmp_path / "out"
    grids = ["--grid=reduction_rate=32,64", "--grid=kernel_size=3,8"]
    code, lines = sweep(
        "--paper=table2", "--datasets=GSC", "--methods=conformer_pfeiffer", "--data_root=/d", f"--output_folder={out}",
        "--seeds=1,2", *grids, "--print",
    )  # fmt: skip
    combinations = [(r, k) for r in (32, 64) for k in (3, 8)]
    expected = [
        command("GSC", "conformer_pfeiffer", out, seed, shots).replace(
            "/conformer_pfeiffer/", f"/conformer_pfeiffer/reduction_rate-{r},kernel_size-{k}/"
        )
        + f" --reduction_rate={r} --kernel_size={k}"
        for r, k in combinations
        for seed in (1, 2)
        for shots in TABLE2_K["GSC"]
    ]
    assert code == 0 and len(expected) == 32 and lines == [*expected, report(out)]
    code, lines = sweep(
        "--datasets=ESC50", "--methods=adapter", "--data_root=/d", f"--output_folder={out}", *grids[:1], "--print"
    )
    assert code == 0 and [line.split("--output_folder=")[1].split()[0] for line in lines[:-1]] == [
        f"{out}/ESC50/adapter/reduction_rate-{r}/seed10" for r in (32, 64)
    ]


D = "--data_root=/d"
P1 = "--paper=table1"
ERRORS = {
    "no datasets": ([D, "--methods=lora"], r"--datasets DS,\.\.\. is required \(or --paper TABLE"),
    "dataset not in the table": (
        [D, P1, "--datasets=GSC,IEMOCAP"],
        r"--datasets: table1 has no 'IEMOCAP'; its datasets are ESC50,UrbanSound8K,GSC,FSC$",
    ),
    "unknown preset": (
        [D, "--paper=table3", "--methods=wav2vec2_linear,lora"],
        r"--methods: table3 has no preset 'lora' on GSC,FSC,IEMOCAP; its presets are wav2vec2_full_ft,"
        r"wav2vec2_linear,wav2vec2_bottleneck,wav2vec2_conformer$",
    ),
    "backbone against the table": ([D, "--paper=table3", "--backbone=ast"], r"--paper table3 runs wav2vec2, not ast"),
    "few-shot with paper": ([D, "--paper=table2", "--few_shot_samples=4"], r"--paper table2 runs the table's own K"),
    "grid own option": ([D, P1, "--grid=seed=1,2"], r"--grid seed=1,2: the sweep sets --seed itself; use its --seeds"),
    "grid fold": ([D, P1, "--grid=fold=1,2"], r"--grid fold=1,2: a run is all its folds"),
    "grid twice": ([D, P1, "--grid=lr=1", "--grid=lr=2"], r"--grid: lr given twice; give all its values in one"),
    "grid empty": ([D, P1, "--grid=lr="], r"--grid lr: give a comma-separated list of values, got ''"),
    "grid empty value": ([D, P1, "--grid=lr=1,,2"], r"--grid lr: give a comma-separated list of values"),
    "grid without values": ([D, P1, "--grid=lr"], r"--grid: expected KEY=V1,V2,\.\.\. with KEY a setting name"),
    "grid bad value": ([D, P1, "--grid=lr=a/b"], r"--grid lr: the value 'a/b' cannot name a folder"),
    "grid repeated value": ([D, P1, "--grid=lr=1,1"], r"--grid lr: a value is given twice"),
    "grid and extra": ([D, P1, "--grid=lr=1,2", "--", "--lr=3"], r"--grid: lr is also given after `--`"),
    "equals in a path": (["--data_root=/d/a=b", P1], r"the recipes read every '=' of an option as a separator"),
    "print and slurm": ([D, P1, "--slurm=/tmp/x"], r"--print and --slurm: give one"),
    "sbatch without slurm": ([D, P1, "--sbatch=--gres=gpu:1"], r"--sbatch and --sbatch_report go with --slurm DIR"),
    "sbatch not an option": ([D, P1, "--sbatch=gres"], r"--sbatch: expected an sbatch option such as"),
    "sbatch array": ([D, P1, "--sbatch=--array=1-3"], r"array.sbatch sets --array and --output itself"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_one_line_errors(tmp_path, capsys, case):
    check_one_line_error(tmp_path, capsys, *ERRORS[case])


# --- the recipes' folds ---------------------------------------------------------------------------------------


def test_recipe_folds_are_read_from_the_recipes_declarations():
    folds = {dataset: recipe_folds(REPO / "recipes" / dataset / "train.py") for dataset in (*OFFICIAL, "AudioFolder")}
    assert folds == {
        "ESC50": (1, 2, 3, 4, 5),
        "UrbanSound8K": tuple(range(1, 11)),
        "IEMOCAP": tuple(range(1, 11)),  # tuple(range(1, IEMOCAP_NUM_FOLDS + 1)), imported from petl_modules.data
        "GSC": (),
        "FSC": (),
        "AudioFolder": (),
    }


@pytest.mark.parametrize(
    ("source", "folds"),
    [
        ("raise SystemExit('ran')\nFOLDS = [1, 3]\n", (1, 3)),  # read, never run
        ("N = 4\nFOLDS = tuple(range(1, N + 1))\n", (1, 2, 3, 4)),
        ("from petl_modules.data import IEMOCAP_NUM_FOLDS as N\nFOLDS = tuple(range(N - 1, N + 1))\n", (9, 10)),
        ("FOLDS: tuple = (2,)\n", (2,)),
        ("FOLDS = make_folds()\n", None),
        ("from elsewhere import N\nFOLDS = tuple(range(1, N + 1))\n", None),
        ("from petl_modules.data import CLASSES_FILE\nFOLDS = (CLASSES_FILE,)\n", None),
        ("FOLDS = (1, 1)\n", None),
        ("FOLDS = ('a',)\n", None),
        ("DATASET = 'X'\n", None),
        ("FOLDS = (\n", None),
    ],
)
def test_recipe_folds_read_constant_declarations_only(tmp_path, source, folds):
    (tmp_path / "train.py").write_text(source)
    assert recipe_folds(tmp_path / "train.py") == folds


# --- SLURM files ------------------------------------------------------------------------------------------------


def data_root(tmp_path: Path) -> Path:
    for folder in OFFICIAL.values():
        (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
    return tmp_path / "data"


def fold_result(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fold_result.json").write_text("{}")


def test_slurm_writes_one_task_per_unfinished_fold_or_run(tmp_path):
    data, out, slurm = data_root(tmp_path), tmp_path / "out", tmp_path / "slurm"
    fold_result(out / "ESC50/paper/lora/seed1/fold1")  # seed1: folds 1 and 3 done
    fold_result(out / "ESC50/paper/lora/seed1/fold3")
    for fold in range(1, 6):  # seed2: every fold done, results.json stale (two folds ended at once)
        fold_result(out / f"ESC50/paper/lora/seed2/fold{fold}")
    write_results(out / "ESC50/paper/lora/seed2", folds_missing=["5"])
    write_results(out / "GSC/paper/lora/seed2")  # finished
    argv = [P1, "--datasets=ESC50,GSC", "--methods=lora", f"--data_root={data}", "--seeds=1,2"]
    argv += [f"--output_folder={out}", f"--slurm={slurm}", "--sbatch=--gres=gpu:1", "--sbatch=--time=24:00:00"]
    code, lines = sweep(*argv, "--", "--device=cuda")
    assert code == 0
    prefix = f"cd {REPO} && {PYTHON} "

    def task(dataset: str, seed: int, fold: int | None = None) -> str:
        line = prefix + command(dataset, "lora", out, seed, root=str(data))[len("python ") :] + " --device=cuda"
        return line + (f" --fold={fold}" if fold else "")

    tasks = [task("ESC50", 1, fold) for fold in (2, 4, 5)] + [task("ESC50", 2), task("GSC", 1)]
    assert (slurm / "runs.txt").read_text() == "".join(f"{line}\n" for line in tasks)
    array = (slurm / "array.sbatch").read_text()
    assert array.startswith("#!/bin/bash\n")
    directives = [line for line in array.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=petl-sweep",
        "#SBATCH --array=1-5",
        f"#SBATCH --output={slurm}/logs/array-%A_%a.out",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=24:00:00",
    ]
    report_script = (slurm / "report.sbatch").read_text()
    assert f"\ncd {REPO} && {PYTHON} -m petl_apps.report {out} --out {out}/report\n" in report_script
    assert "#SBATCH --gres=gpu:1\n#SBATCH --time=24:00:00\n" in report_script
    assert (slurm / "logs").is_dir()
    for name in ("array.sbatch", "report.sbatch", "submit.sh"):
        assert os.access(slurm / name, os.X_OK), name
    assert lines == [
        f"{slurm}/runs.txt: 5 task(s) for 3 unfinished run(s) of 4",
        f"{slurm}/array.sbatch",
        f"{slurm}/report.sbatch",
        f"{slurm}/submit.sh",
        f"submit: bash {slurm}/submit.sh (the array, then the report once it has ended)",
    ]
    # --sbatch_report replaces the --sbatch lines in report.sbatch; --fold after `--` makes runs one task each.
    code, _ = sweep(*argv, "--sbatch_report=--time=0:10:00", "--", "--fold=2")
    assert code == 0 and len((slurm / "runs.txt").read_text().splitlines()) == 3
    assert all(line.endswith(" --fold=2") for line in (slurm / "runs.txt").read_text().splitlines())
    report_directives = [line for line in (slurm / "report.sbatch").read_text().splitlines() if "#SBATCH" in line]
    assert report_directives == [
        "#SBATCH --job-name=petl-report",
        f"#SBATCH --output={slurm}/logs/report-%j.out",
        "#SBATCH --time=0:10:00",
    ]


def bash(script: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}, timeout=60
    )


def test_array_tasks_run_their_line_and_exit_with_its_status(tmp_path):
    slurm = tmp_path / "slurm"
    write_slurm(slurm, ["echo one", "echo two; exit 3"], "echo report")
    done = bash(slurm / "array.sbatch", tmp_path, SLURM_ARRAY_TASK_ID="1")
    assert done.returncode == 0 and done.stdout == "task 1: echo one\none\ntask 1: exit status 0\n"
    assert bash(slurm / "array.sbatch", tmp_path, SLURM_ARRAY_TASK_ID="2").returncode == 3
    for task in ("3", "", "1;x"):
        missing = bash(slurm / "array.sbatch", tmp_path, SLURM_ARRAY_TASK_ID=task)
        assert missing.returncode == 2 and missing.stderr.startswith("array.sbatch: "), missing.stderr
    report_run = bash(slurm / "report.sbatch", tmp_path)
    assert report_run.returncode == 0 and report_run.stdout == "report\n"


def stand_in_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An `sbatch` on PATH that logs its arguments and answers as sbatch does."""
    bin_folder, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_folder.mkdir()
    (bin_folder / "sbatch").write_text(
        f'#!/bin/bash\necho "$*" >> {log}\n'
        'case "$*" in *--parsable*) echo "4242;cluster" ;; *) echo "Submitted batch job 4243" ;; esac\n'
    )
    (bin_folder / "sbatch").chmod(0o755)
    return {"PATH": f"{bin_folder}:{os.environ['PATH']}"}, log


def test_submit_submits_the_array_then_the_report_after_it(tmp_path):
    slurm = tmp_path / "slurm"
    write_slurm(slurm, ["echo one"], "echo report")
    env, log = stand_in_sbatch(tmp_path)
    submitted = bash(slurm / "submit.sh", tmp_path, **env)
    assert submitted.returncode == 0, submitted.stderr
    assert log.read_text().splitlines() == [
        f"--parsable {slurm}/array.sbatch",
        f"--dependency=afterany:4242 {slurm}/report.sbatch",
    ]
    assert submitted.stdout == "submitted the job array 4242 (1 tasks)\nSubmitted batch job 4243\n"


def test_nothing_left_submits_the_report_alone(tmp_path):
    data, out, slurm = data_root(tmp_path), tmp_path / "out", tmp_path / "slurm"
    argv = [P1, "--datasets=GSC", "--methods=lora", f"--data_root={data}", f"--output_folder={out}", f"--slurm={slurm}"]
    assert sweep(*argv)[0] == 0 and (slurm / "array.sbatch").is_file()
    write_results(out / "GSC/paper/lora/seed10")
    code, lines = sweep(*argv)
    assert code == 0 and lines[0] == f"{slurm}/runs.txt: 0 task(s) for 0 unfinished run(s) of 1"
    assert lines[-1] == f"submit: bash {slurm}/submit.sh (nothing left to run: the report alone)"
    assert (slurm / "runs.txt").read_text() == "" and not (slurm / "array.sbatch").exists()
    env, log = stand_in_sbatch(tmp_path)
    assert bash(slurm / "submit.sh", tmp_path, **env).returncode == 0
    assert log.read_text().splitlines() == [f"{slurm}/report.sbatch"]


def test_slurm_stops_before_writing_when_a_data_folder_is_missing(tmp_path, capsys):
    slurm = tmp_path / "slurm"
    argv = [P1, "--datasets=GSC", f"--data_root={tmp_path}", f"--output_folder={tmp_path}", f"--slurm={slurm}"]
    code, _ = sweep(*argv)
    assert code == 1 and f"GSC data folder {tmp_path}/speech_commands_v0.02 not found" in capsys.readouterr().err
    assert not slurm.exists()
