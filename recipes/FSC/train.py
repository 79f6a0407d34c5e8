#!/usr/bin/env python3
"""Fluent Speech Commands intent classification (31 intents) on the official split.

    python recipes/FSC/train.py recipes/FSC/hparams/<method>.yaml --data_folder=DIR --output_folder=DIR \
        --backbone_source=HUB_ID_OR_DIR [--backbone=wav2vec2] [--fold=all|K] [--few_shot_samples=K]

See README.md beside this file for the protocol.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: petl_modules

from fsc_prepare import prepare_fsc  # noqa: E402

from petl_modules.recipe import DatasetRecipe, main  # noqa: E402

RECIPE = DatasetRecipe(name="FSC", prepare=prepare_fsc)

if __name__ == "__main__":
    main(RECIPE)
