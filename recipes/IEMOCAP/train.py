#!/usr/bin/env python3
"""IEMOCAP 4-class emotion recognition, 10 speaker folds; also reports unweighted accuracy (mean per-class recall).

    python recipes/IEMOCAP/train.py recipes/IEMOCAP/hparams/<method>.yaml --data_folder=DIR --output_folder=DIR \
        --backbone_source=HUB_ID_OR_DIR [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K]

See README.md beside this file for the protocol.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: petl_modules

from iemocap_prepare import prepare_iemocap  # noqa: E402

from petl_modules.data import IEMOCAP_NUM_FOLDS  # noqa: E402
from petl_modules.recipe import DatasetRecipe, main  # noqa: E402
from petl_modules.training import unweighted_accuracy  # noqa: E402

RECIPE = DatasetRecipe(
    name="IEMOCAP",
    prepare=prepare_iemocap,
    folds=tuple(range(1, IEMOCAP_NUM_FOLDS + 1)),
    extra_metrics={"unweighted_accuracy": unweighted_accuracy},
)

if __name__ == "__main__":
    main(RECIPE)
