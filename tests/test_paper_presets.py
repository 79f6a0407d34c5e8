"""The paper presets: one per row of the MLSP 2024 paper's Tables 1-3, on every dataset of the row.

Each preset loads, holds the row's settings, counts in closed form on the base-size backbones (random weights in the
hub configurations: AST-base, Wav2Vec2-base), and its count as the paper counts it rounds to the paper's "params"
column, except for the cells listed in KNOWN_DIFFERENCES (docs/reproduction.md says why). The paper's numbers are
read from petl_apps/paper/mlsp2024.json, the one place they are typed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipe_helpers import recipe_args, run_recipes, write_workspace

from petl_apps.paper import TABLES, paper_tables, preset_file, table_cells, table_presets
from petl_modules.hparams_loader import compose, load_hparams
from petl_modules.random_backbones import write_random_checkpoint

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
D, LAYERS, FFN = 768, 12, 3072  # AST-base and Wav2Vec2-base
CLASSES = {"ESC50": 50, "UrbanSound8K": 10, "GSC": 35, "FSC": 31, "IEMOCAP": 4}
KERNEL = {"ESC50": 8, "UrbanSound8K": 8, "GSC": 31, "FSC": 31}  # the paper's conformer kernels on AST
NORM = 2 * D  # one LayerNorm


def bottleneck(rate: int) -> int:
    b = D // rate
    return 2 * D * b + b + D


def conformer(rate: int, k: int) -> int:
    b = D // rate
    return 2 * D + (2 * D * b + 2 * b) + (b * k + b) + 2 * b + (b * D + D)


def ast_positions(dataset: str) -> int:
    """Positional rows of AST at the recipe's input: 12 frequency rows x time columns + [CLS], [DIST]."""
    frames = {"ESC50": 500, "UrbanSound8K": 400, "GSC": 100, "FSC": 400}[dataset]
    return 12 * ((frames - 16) // 10 + 1) + 2


def expected(preset: str, dataset: str) -> dict[str, int]:
    """Trainable parameters by group, in closed form (AST: final LayerNorm and sub-layer norms train; Wav2Vec2:
    no LayerNorm trains)."""
    head = D * CLASSES[dataset] + CLASSES[dataset]
    if preset.startswith("wav2vec2_"):
        iemocap = dataset == "IEMOCAP"
        method = {
            "wav2vec2_full_ft": 3 * (4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * NORM),
            "wav2vec2_linear": 0,
            "wav2vec2_bottleneck": LAYERS * bottleneck(16 if iemocap else 64),
            "wav2vec2_conformer": LAYERS * conformer(24 if iemocap else 96, 31),
        }[preset]
        return {"method": method, "head": head, "final_norm": 0, "sublayer_norm": 0}
    k = KERNEL[dataset]
    method, norms, final_norm = {
        "linear": (0, 0, NORM),
        "bitfit": (LAYERS * (4 * D + FFN + D + 2 * D), 0, D),  # biases only, the final norm's too
        "spt300": (300 * D, 0, NORM),
        "dpt25": (LAYERS * 25 * D, 0, NORM),
        "prefix24": (LAYERS * 24 * D, 0, NORM),
        "lora": (LAYERS * 2 * (2 * D * 6), 0, NORM),  # rank 6 on q and v
        "bottleneck_pfeiffer": (LAYERS * bottleneck(64), LAYERS * NORM, NORM),
        "bottleneck_houlsby": (2 * LAYERS * bottleneck(64), 2 * LAYERS * NORM, NORM),
        "conformer_pfeiffer": (LAYERS * conformer(96, k), LAYERS * NORM, NORM),
        "conformer_houlsby": (2 * LAYERS * conformer(96, k), 2 * LAYERS * NORM, NORM),
    }.get(preset, (None, 0, NORM))
    if preset == "full_ft":  # every tensor but the final norm (its own group), the positional table cut
        patch = 16 * 16 * D + D
        tokens = (2 + ast_positions(dataset) - 2) * D + 2 * D  # [CLS], [DIST] and the positional table
        layer = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * NORM
        method = patch + tokens + LAYERS * layer
    return {"method": method, "head": head, "final_norm": final_norm, "sublayer_norm": norms}


def paper_count(preset: str, groups: dict[str, int]) -> int:
    """The count as the paper prints it: the method and the sub-layer norms beside it; BitFit counts every bias
    it trains (the final norm's too); linear probing counts the head and the final norm it trains."""
    if preset in ("linear", "wav2vec2_linear"):
        return groups["head"] + groups["final_norm"]
    if preset == "bitfit":
        return groups["method"] + groups["final_norm"]
    return groups["method"] + groups["sublayer_norm"]


def rounded(count: int, printed: str) -> str:
    """`count` printed in the unit of `printed` (K or M), rounded to the nearest unit."""
    unit = {"K": 1e3, "M": 1e6}[printed[-1]]
    return f"{round(count / unit)}{printed[-1]}"


# (preset, dataset) -> (the paper's params, ours as the paper counts them): cells where the two differ.
KNOWN_DIFFERENCES = {
    # The table prints one column for all datasets, the conformer's at k = 31; ESC-50 and UrbanSound8K use k = 8.
    ("conformer_pfeiffer", "ESC50"): ("271K", "269K"),
    ("conformer_pfeiffer", "UrbanSound8K"): ("271K", "269K"),
    ("conformer_houlsby", "ESC50"): ("542K", "537K"),
    ("conformer_houlsby", "UrbanSound8K"): ("542K", "537K"),
    # 2 x 252,288 + 2 x 18,432 = 541,440: the paper prints 542K.
    ("conformer_houlsby", "GSC"): ("542K", "541K"),
    ("conformer_houlsby", "FSC"): ("542K", "541K"),
    # AST-base besides its final norm, the positional table at the recipe's input: 85,706,496 on ESC-50 (590
    # positions), 85.6M on UrbanSound8K and FSC (470), 85.3M on GSC (110); the paper prints 85M for all.
    ("full_ft", "ESC50"): ("85M", "86M"),
    ("full_ft", "UrbanSound8K"): ("85M", "86M"),
    ("full_ft", "FSC"): ("85M", "86M"),
    # Table 3: the code trains Wav2Vec2's last 3 layers (21.3M); 90M is the model's size.
    ("wav2vec2_full_ft", "GSC"): ("90M", "21M"),
    ("wav2vec2_full_ft", "FSC"): ("90M", "21M"),
    ("wav2vec2_full_ft", "IEMOCAP"): ("90M", "21M"),
    # Heads: 35 GSC words (26,915) and 4 IEMOCAP emotions (3,076); the paper prints 24K and 4K.
    ("wav2vec2_linear", "GSC"): ("24K", "27K"),
    ("wav2vec2_linear", "IEMOCAP"): ("4K", "3K"),
    # The Wav2Vec2 path trains no sub-layer norm (the reference's); 230,544 and 252,288 are the methods alone,
    # 248,976 and 270,720 with the norms counted as in Table 1: the paper prints 250K and 272K.
    ("wav2vec2_bottleneck", "GSC"): ("250K", "231K"),
    ("wav2vec2_bottleneck", "FSC"): ("250K", "231K"),
    ("wav2vec2_conformer", "GSC"): ("272K", "252K"),
    ("wav2vec2_conformer", "FSC"): ("272K", "252K"),
    ("wav2vec2_conformer", "IEMOCAP"): ("927K", "926K"),  # 926,208
}
PRESET_CELLS = sorted({(cell.preset, cell.dataset) for table in TABLES for cell in table_cells(table)})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {kind: write_random_checkpoint(kind, root / kind, size="base") for kind in ("ast", "wav2vec2")}


def preset_groups(sources, preset: str, dataset: str) -> dict[str, int]:
    kind = "wav2vec2" if preset.startswith("wav2vec2_") else "ast"
    overrides = {"backbone_source": str(sources[kind]), "data_folder": "unused", "output_folder": "unused"}
    return load_hparams(preset_file(RECIPES, dataset, preset), overrides)["model"].trainable_parameter_groups()


def test_every_table_cell_has_its_preset_and_every_preset_a_cell():
    files = {(path.stem, path.parents[2].name) for path in RECIPES.glob("*/hparams/paper/*.yaml")}
    assert files == set(PRESET_CELLS)
    assert len(table_cells("table1")) == 44 and len(table_cells("table2")) == 32 and len(table_cells("table3")) == 12
    assert table_presets("table2") == {
        name: ["dpt25", "lora", "bottleneck_pfeiffer", "conformer_pfeiffer"] for name in ("ESC50", "GSC")
    }


@pytest.mark.parametrize(("preset", "dataset"), PRESET_CELLS, ids=[f"{d}-{p}" for p, d in PRESET_CELLS])
def test_preset_holds_the_rows_settings(preset, dataset):
    tree = compose(preset_file(RECIPES, dataset, preset))
    assert tree["paper_preset"] == preset and tree["method_name"] == preset
    assert tree["backbone"] == ("wav2vec2" if preset.startswith("wav2vec2_") else "ast")
    if "conformer" in preset:
        assert tree["kernel_size"] == KERNEL.get(dataset, 31)
    if preset.startswith(("bottleneck_pfeiffer", "conformer_pfeiffer", "wav2vec2_bottleneck", "wav2vec2_conformer")):
        assert tree["adapter_type"] == "Pfeiffer" and tree["adapter_location"] == "MHSA"
    if preset == "lora":
        assert (tree["reduction_rate_lora"], tree["alpha_lora"], tree["lora_scaling"]) == (128, 16, "reference")


@pytest.mark.parametrize(("preset", "dataset"), PRESET_CELLS, ids=[f"{d}-{p}" for p, d in PRESET_CELLS])
def test_preset_counts_in_closed_form_and_as_the_paper_prints_them(sources, preset, dataset):
    groups = preset_groups(sources, preset, dataset)
    assert groups == expected(preset, dataset)
    printed = next(
        cell.params
        for cell in table_cells("table3" if preset.startswith("wav2vec2_") else "table1")
        if (cell.preset, cell.dataset) == (preset, dataset)
    )
    if printed is None:  # the paper prints no count for this cell (linear probing on GSC and FSC)
        assert (preset, dataset) in {("linear", "GSC"), ("linear", "FSC")}
        return
    ours = rounded(paper_count(preset, groups), printed)
    assert (printed, ours) == KNOWN_DIFFERENCES.get((preset, dataset), (printed, printed))


def test_the_paper_file_names_its_source_and_protocol():
    tables = paper_tables()
    assert "2312.03694v4" in tables["source"]
    assert "5 rotations" in tables["protocol"] and "10 folds" in tables["protocol"]


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory):
    """Every preset once on generated data in the official layouts, tiny backbones (AST or Wav2Vec2, as the preset
    says): each on GSC, plus the ESC-50 conformer (k = 8, one fold) and the IEMOCAP Wav2Vec2 conformer (rate 24)."""
    root = tmp_path_factory.mktemp("preset_runs")
    workspace = write_workspace(root)
    cells = [(preset, "GSC") for preset in sorted({p for p, d in PRESET_CELLS if d == "GSC"})]
    cells += [("conformer_pfeiffer", "ESC50"), ("wav2vec2_conformer", "IEMOCAP")]
    commands = []
    for preset, dataset in cells:
        backbone = "wav2vec2" if preset.startswith("wav2vec2_") else "ast"
        output = root / dataset / preset
        hparams = preset_file(RECIPES, dataset, preset)
        commands.append((dataset, recipe_args(dataset, preset, workspace, output, backbone=backbone, hparams=hparams)))
    outcomes = run_recipes(commands, root / "outcomes.json")
    return {cell: (outcome, root / cell[1] / cell[0]) for cell, outcome in zip(cells, outcomes)}


def test_every_preset_trains_on_generated_data(preset_runs):
    for (preset, dataset), (outcome, output) in preset_runs.items():
        assert outcome["code"] == 0, f"{dataset} {preset}: {outcome['message']}"
        results = json.loads((output / "results.json").read_text())
        assert results["settings"]["paper_preset"] == preset, (dataset, preset)
        assert results["backbone"] == ("wav2vec2" if preset.startswith("wav2vec2_") else "ast")
        assert results["mean"]["test"]["accuracy"] is not None
