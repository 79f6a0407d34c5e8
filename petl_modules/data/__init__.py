"""Data side of the project: audio reading, manifests, fold protocols, few-shot sampling."""

from petl_modules.data.audio import AudioError, AudioTooLongError, audio_info, decode_audio, read_audio
from petl_modules.data.feature_cache import FeatureCache
from petl_modules.data.manifest import (
    CLASSES_FILE,
    OPTIONS_FILE,
    REQUIRED_COLUMNS,
    DataPreparationError,
    audio_row,
    prepare_once,
    read_classes,
    read_manifest,
    read_metadata_csv,
    require_dir,
    write_manifest,
)
from petl_modules.data.prepare import prepare_cli, prepare_dataset
from petl_modules.data.splits import (
    IEMOCAP_NUM_FOLDS,
    assign_splits,
    check_few_shot,
    few_shot_sample,
    iemocap_split,
    rotation_split,
)

__all__ = [
    "CLASSES_FILE",
    "IEMOCAP_NUM_FOLDS",
    "OPTIONS_FILE",
    "REQUIRED_COLUMNS",
    "AudioError",
    "DataPreparationError",
    "FeatureCache",
    "assign_splits",
    "AudioTooLongError",
    "audio_info",
    "decode_audio",
    "audio_row",
    "check_few_shot",
    "few_shot_sample",
    "iemocap_split",
    "prepare_cli",
    "prepare_dataset",
    "prepare_once",
    "read_audio",
    "read_classes",
    "read_manifest",
    "read_metadata_csv",
    "require_dir",
    "rotation_split",
    "write_manifest",
]
