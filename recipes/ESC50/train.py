#!/usr/bin/env python3
"""ESC-50 environmental sound classification, 5 rotations (train 3 folds, valid 1, test 1).

    python recipes/ESC50/train.py recipes/ESC50/hparams/<method>.yaml --data_folder=DIR --output_folder=DIR \
        --backbone_source=HUB_ID_OR_DIR [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K]

See README.md beside this file for the protocol.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: petl_modules

from esc50_prepare import prepare_esc50  # noqa: E402

from petl_modules.recipe import DatasetRecipe, main  # noqa: E402

RECIPE = DatasetRecipe(name="ESC50", prepare=prepare_esc50, folds=tuple(range(1, 6)))

if __name__ == "__main__":
    main(RECIPE)
