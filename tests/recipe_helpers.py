"""Tiny datasets, tiny checkpoints and in-process access to the five recipes, for the recipe tests."""

from __future__ import annotations

from pathlib import Path

from petl_modules.checkpoints import write_random_checkpoint
from petl_modules.data.synthetic import make_esc50, make_fsc, make_gsc, make_iemocap, make_urbansound8k

REPO = Path(__file__).resolve().parent.parent
METHODS = (
    "linear",
    "full_ft",
    "adapter",
    "conformer_adapter",
    "prompt_tuning",
    "prefix_tuning",
    "lora",
    "bitfit",
    "dense_moa",
    "soft_moa",
)
TARGET_LENGTH = 50  # AST frames: 4 time columns x 12 frequency rows

# recipe folder -> (dataset generator with its tiny options, class count, extra options for a quick run)
DATASETS = {
    "FSC": (lambda root: make_fsc(root, num_classes=4, n_per_class=2), 4, []),
    "GSC": (lambda root: make_gsc(root, num_words=4, n_per_class=2), 4, []),
    "ESC50": (lambda root: make_esc50(root, num_classes=3, n_per_fold=2), 3, ["--fold=1"]),
    "UrbanSound8K": (lambda root: make_urbansound8k(root, num_classes=3, n_per_fold=1), 3, ["--fold=2"]),
    "IEMOCAP": (
        lambda root: make_iemocap(root, n_per_class=1, dialogs_per_session=1),
        4,
        ["--fold=3", "--few_shot_samples=2"],
    ),
}


def write_workspace(root: Path) -> dict[str, Path]:
    """Every dataset and the tiny AST / wav2vec2 checkpoints under `root`."""
    paths = {name: make(root / "data" / name) for name, (make, _, _) in DATASETS.items()}
    paths["ast"] = write_random_checkpoint("ast", root / "ast")
    paths["wav2vec2"] = write_random_checkpoint("wav2vec2", root / "wav2vec2")
    return paths


def recipe_args(
    dataset: str, method: str, workspace: dict[str, Path], output: Path, *extra: str, backbone: str = "ast"
) -> list[str]:
    """The command line of a quick tiny run (1 epoch, batch 4); an option in `extra` replaces the default."""
    _, num_classes, options = DATASETS[dataset]
    args = [
        str(REPO / "recipes" / dataset / "hparams" / f"{method}.yaml"),
        f"--data_folder={workspace[dataset]}",
        f"--output_folder={output}",
        f"--backbone={backbone}",
        f"--backbone_source={workspace[backbone]}",
        f"--num_classes={num_classes}",
        f"--target_length={TARGET_LENGTH}",
        "--number_of_epochs=1",
        "--batch_size=4",
        "--num_workers=0",
        "--device=cpu",
        "--noprogressbar",
        *options,
        *extra,
    ]
    last = {arg.split("=", 1)[0]: index for index, arg in enumerate(args)}
    return [arg for index, arg in enumerate(args) if last[arg.split("=", 1)[0]] == index]
