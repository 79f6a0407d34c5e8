"""Loading pretrained Hugging Face backbones from a hub id or a local folder, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging


class BackboneLoadError(RuntimeError):
    """The backbone could not be loaded; the message says which source and how to fix it."""


def _local_config(source: str) -> dict | None:
    """The config.json of a local model folder, or None when `source` is not a path."""
    path = Path(source).expanduser()
    # A hub id is "org/name"; anything that exists, starts like a path or nests deeper is a folder.
    looks_like_path = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if not looks_like_path:
        return None
    if not path.is_dir():
        raise BackboneLoadError(
            f"backbone_source '{source}': folder not found; expected a Hugging Face model folder "
            "(config.json + model.safetensors) or a hub id such as MIT/ast-finetuned-audioset-10-10-0.4593"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneLoadError(
            f"backbone_source '{source}': no config.json in this folder; expected a Hugging Face model folder "
            "(config.json + model.safetensors or pytorch_model.bin)"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise BackboneLoadError(f"backbone_source '{source}': config.json is not valid JSON ({error})") from None


def load_pretrained(model_class: type[PreTrainedModel], source: str, model_types: tuple[str, ...]) -> PreTrainedModel:
    """Load `model_class` from `source`, refusing other architectures and incomplete checkpoints.

    Every missing weight is an error: a silently re-initialised tensor (the reference implementation's
    positional embeddings) is worse than a crash.
    """
    hf_logging.disable_progress_bar()
    config = _local_config(source)
    if config is not None and config.get("model_type") not in model_types:
        raise BackboneLoadError(
            f"backbone_source '{source}': model_type is '{config.get('model_type')}', "
            f"expected one of {', '.join(model_types)}"
        )
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError) as error:
        if config is not None:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackboneLoadError(f"backbone_source '{source}': cannot load the weights ({first_line})") from None
        raise BackboneLoadError(
            f"backbone_source '{source}': not a local folder and the Hugging Face hub could not provide it "
            "(offline?); download it once (huggingface-cli download "
            f"{source} --local-dir DIR) and pass --backbone_source=DIR"
        ) from None
    if model.config.model_type not in model_types:
        raise BackboneLoadError(
            f"backbone_source '{source}': model_type is '{model.config.model_type}', "
            f"expected one of {', '.join(model_types)}"
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise BackboneLoadError(
            f"backbone_source '{source}': {len(missing)} weights missing from the checkpoint "
            f"(first: {missing[0]}); is it a {model_class.__name__} checkpoint?"
        )
    return model


def read_preprocessor_config(source: str) -> dict:
    """The checkpoint's preprocessor_config.json when present (local folder or hub cache), else {}."""
    path = Path(source).expanduser() / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 - optional file; the defaults of the papers' checkpoint apply
        return {}
