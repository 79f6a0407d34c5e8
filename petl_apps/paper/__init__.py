"""The MLSP 2024 paper's Tables 1-3 (arXiv 2312.03694v4): typed once, in `mlsp2024.json`, read from here.

Every row of a table names its preset: `recipes/<DS>/hparams/paper/<preset>.yaml` runs the paper's settings for
that row on that dataset (the settings themselves are `petl_modules/hparams/paper/<preset>.yaml`), and a run of
it records `paper_preset: <preset>` among its settings (results.json). A cell of a table is then found from a
run's preset, dataset and few-shot K (`paper_cell`): Tables 1 and 3 hold the full-data runs, Table 2 the
few-shot ones.

    for cell in table_cells("table2"): cell.dataset, cell.preset, cell.few_shot, cell.accuracy
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PAPER_FILE = Path(__file__).with_name("mlsp2024.json")
TABLES = ("table1", "table2", "table3")
PRESET_FOLDER = "paper"  # recipes/<DS>/hparams/paper/<preset>.yaml


@dataclass(frozen=True)
class PaperCell:
    """One number of a table: `accuracy` (test accuracy %) of `preset` on `dataset` at `few_shot` K (None: all
    the training data), with the row's `label` and its `params` as the paper prints them (None where it prints
    none for this dataset).
    """

    table: str
    preset: str
    label: str
    dataset: str
    few_shot: int | None
    accuracy: float
    params: str | None
    backbone: str


@cache
def paper_tables() -> dict:
    """The content of `mlsp2024.json`: `source`, `protocol` and `tables` (table1..table3)."""
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


def _params(row: dict, dataset: str) -> str | None:
    params = row.get("params")
    return params.get(dataset) if isinstance(params, dict) else params


def table_cells(table: str) -> list[PaperCell]:
    """Every number of `table`, in the paper's order (rows, then datasets, then K)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}; got {table!r}")
    spec = paper_tables()["tables"][table]
    cells = []
    for row in spec["rows"]:
        for dataset in spec["datasets"]:
            values = row["accuracy"].get(dataset)
            if values is None:
                continue
            shots = values.items() if isinstance(values, dict) else [(None, values)]
            for k, accuracy in shots:
                cells.append(
                    PaperCell(
                        table,
                        row["preset"],
                        row["label"],
                        dataset,
                        None if k is None else int(k),
                        float(accuracy),
                        _params(row, dataset),
                        spec["backbone"],
                    )
                )
    return cells


def paper_cell(preset: str, dataset: str, few_shot: int | None = None) -> PaperCell | None:
    """The paper's number for a run of `preset` on `dataset` at `few_shot` K, or None when the paper has none."""
    for table in TABLES:
        for cell in table_cells(table):
            if (cell.preset, cell.dataset, cell.few_shot) == (preset, dataset, few_shot):
                return cell
    return None


def table_presets(table: str) -> dict[str, list[str]]:
    """The presets `table` runs on each dataset (dataset -> presets), in the paper's row order."""
    presets: dict[str, list[str]] = {}
    for cell in table_cells(table):
        names = presets.setdefault(cell.dataset, [])
        if cell.preset not in names:
            names.append(cell.preset)
    return presets


def preset_file(recipes: Path, dataset: str, preset: str) -> Path:
    """`<recipes>/<dataset>/hparams/paper/<preset>.yaml`."""
    return Path(recipes) / dataset / "hparams" / PRESET_FOLDER / f"{preset}.yaml"


def source() -> str:
    return paper_tables()["source"]


def protocol() -> str:
    return paper_tables()["protocol"]


__all__ = [
    "PAPER_FILE",
    "PRESET_FOLDER",
    "TABLES",
    "PaperCell",
    "paper_cell",
    "paper_tables",
    "preset_file",
    "protocol",
    "source",
    "table_cells",
    "table_presets",
]
