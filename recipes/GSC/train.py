#!/usr/bin/env python3
"""Google Speech Commands v2 keyword classification (35 words) on the official split.

    python recipes/GSC/train.py recipes/GSC/hparams/<method>.yaml --data_folder=DIR --output_folder=DIR \
        --backbone_source=HUB_ID_OR_DIR [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K]

See README.md beside this file for the protocol.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: petl_modules

from gsc_prepare import prepare_gsc  # noqa: E402

from petl_modules.recipe import DatasetRecipe, main  # noqa: E402

RECIPE = DatasetRecipe(name="GSC", prepare=prepare_gsc)

if __name__ == "__main__":
    main(RECIPE)
