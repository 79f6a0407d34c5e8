#!/usr/bin/env python3
"""UrbanSound8K classification, 10 folds; validation is the next fold, so the test fold never selects.

    python recipes/UrbanSound8K/train.py recipes/UrbanSound8K/hparams/<method>.yaml \
        --data_folder=DIR --output_folder=DIR --backbone_source=HUB_ID_OR_DIR \
        [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K]

See README.md beside this file for the protocol.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: petl_modules

from urbansound8k_prepare import prepare_urbansound8k  # noqa: E402

from petl_modules.recipe import DatasetRecipe, main  # noqa: E402

RECIPE = DatasetRecipe(name="UrbanSound8K", prepare=prepare_urbansound8k, folds=tuple(range(1, 11)))

if __name__ == "__main__":
    main(RECIPE)
