"""Your own data: manifests from a folder of class sub-folders, or from a CSV `path,label[,split]`.

The layouts, the split lists and the seeded stratified split are described in
`petl_modules/data/audiofolder.py` and in README.md beside this file.
Usage: `python audiofolder_prepare.py DATA_FOLDER SAVE_FOLDER [--csv_file FILE] [--valid_list FILE]
[--test_list FILE] [--valid_fraction F] [--test_fraction F] [--split_seed N] [--few_shot_samples K]`.
"""

from __future__ import annotations

import argparse

from petl_modules.data import prepare_cli
from petl_modules.data.audiofolder import prepare_audiofolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The layout and split options of `prepare_audiofolder`."""
    parser.add_argument("--csv_file", default=None, help="CSV path,label[,split], relative to DATA_FOLDER")
    parser.add_argument("--valid_list", default=None, help="file of relative paths that form valid")
    parser.add_argument("--test_list", default=None, help="file of relative paths that form test")
    parser.add_argument("--valid_fraction", type=float, default=0.1, help="share of each class drawn for valid")
    parser.add_argument("--test_fraction", type=float, default=0.1, help="share of each class drawn for test")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the drawn split")


if __name__ == "__main__":
    prepare_cli(prepare_audiofolder, __doc__, add_arguments=add_arguments)
