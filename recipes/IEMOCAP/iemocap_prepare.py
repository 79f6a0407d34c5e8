"""IEMOCAP: 4-class emotion manifests for one of 10 leave-one-speaker-out folds.

Kept labels are neu, hap, sad, ang, with exc merged into hap; every other
label (fru, sur, xxx...) is dropped. Fold `k` holds out session
`(k + 1) // 2`: odd folds validate on its female speaker and test on its male
speaker, even folds swap them; the other four sessions train.
Usage: `python iemocap_prepare.py DATA_FOLDER SAVE_FOLDER [--fold K]`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from petl_modules.data import (
    IEMOCAP_NUM_FOLDS,
    DataPreparationError,
    assign_splits,
    audio_row,
    iemocap_split,
    prepare_cli,
    prepare_dataset,
)

DATASET = "IEMOCAP"
EXPECTED = (
    "the official IEMOCAP_full_release layout: <data_folder>/Session<1-5>/dialog/"
    "EmoEvaluation/*.txt and <data_folder>/Session<1-5>/sentences/wav/<dialog>/"
)
LABELS = {"neu": "neu", "hap": "hap", "exc": "hap", "sad": "sad", "ang": "ang"}
# "[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]"
TURN = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\t(\S+)\t(\S+)\t")


def _session_rows(root: Path, session: int) -> list[dict[str, Any]]:
    """Rows of the kept turns of one session.

    The speaker is the session plus the gender letter of the utterance id's
    last part (`Ses01M_impro01_F000` -> `Ses01F`).
    """
    folder = root / f"Session{session}"
    evaluations = folder / "dialog" / "EmoEvaluation"
    # Skip dot-files: macOS copies of the corpus carry "._<name>.txt" resource forks.
    files = sorted(p for p in evaluations.glob("*.txt") if not p.name.startswith("."))
    if not files:
        raise DataPreparationError(f"{DATASET}: no {evaluations}/*.txt found; expected {EXPECTED}")
    rows = []
    for listed_in in files:
        for line in listed_in.read_text(encoding="utf-8", errors="replace").splitlines():
            match = TURN.match(line)
            if not match or match.group(2) not in LABELS:
                continue
            utt_id, emotion = match.groups()
            gender = utt_id.rsplit("_", 1)[-1][:1]
            if gender not in ("F", "M"):
                raise DataPreparationError(f"{DATASET}: {listed_in}: cannot tell the speaker of {utt_id!r}")
            wav = folder / "sentences" / "wav" / listed_in.stem / f"{utt_id}.wav"
            rows.append(audio_row(DATASET, listed_in, utt_id, wav, LABELS[emotion], speaker=f"Ses0{session}{gender}"))
    return rows


def prepare_iemocap(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    fold: int,
    few_shot_samples: int | None = None,
    seed: int = 10,
) -> dict[str, Path]:
    """Write (or reuse) the manifests of fold `fold` in `save_folder/fold<k>`."""
    plan = iemocap_split(fold)

    def collect(root: Path) -> dict[str, list[dict[str, Any]]]:
        rows = [row for session in range(1, 6) for row in _session_rows(root, session)]
        return assign_splits(rows, "speaker", plan, str(root))

    return prepare_dataset(
        DATASET, data_folder, save_folder, EXPECTED, collect, fold=fold, few_shot_samples=few_shot_samples, seed=seed
    )


if __name__ == "__main__":
    prepare_cli(prepare_iemocap, __doc__, num_folds=IEMOCAP_NUM_FOLDS)
