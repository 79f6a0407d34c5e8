"""Export a finished run: only the trained tensors, with what it takes to load and cite them.

    python -m petl_modules.export --run DIR --out DIR [--format speechbrain|peft] [--merge] [--backbone_source=X]

`--run` is a recipe run folder or an output folder holding one run (its selected checkpoint). The export
folder (written beside `--out` and renamed into place: it appears whole or not at all; its files and folders
have the modes the umask gives, 0666 and 0777 less the umask, so colleagues read it as the umask allows) holds

- `trained.safetensors`: the trainable tensors alone (method, final LayerNorm, head, BatchNorm statistics),
  so its size follows the method (LoRA on AST-base: about 1.8 MB), never the frozen backbone's;
- `hyperparams.yaml`: the inference hyperparameters (`AudioClassifier.from_hparams(source=DIR)`,
  `python -m petl_modules.classify --run DIR`); the frozen backbone still comes from `backbone_source`;
- `label_encoder.txt`: the class names in label order (SpeechBrain's `CategoricalEncoder`);
- `export.json`: method and options, the effective LoRA scale, backbone kind, source and revision (a
  local folder: its path and the SHA-256 of its files; a hub id: the cached commit), input settings,
  classes, trainable parameter count, the run and checkpoint it came from, and the files' sizes.

`--format peft` (LoRA only) adds `adapter_config.json` and `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(transformers.ASTModel.from_pretrained(SOURCE), DIR)` loads: the LoRA
tensors, plus the trained final LayerNorm as a `modules_to_save` module. When the run's `target_length`
differs from the checkpoint's `max_length`, the positional grid was carried over to it (see
backbones/ast.py) and is written too, as `position_embeddings.safetensors`; the base is then

    base = ASTModel.from_pretrained(SOURCE, max_length=TARGET_LENGTH, ignore_mismatched_sizes=True)
    base.load_state_dict(safetensors.torch.load_file(DIR + "/position_embeddings.safetensors"), strict=False)

(`export.json` > `peft` names the file and these keyword arguments). Whisper's adapter sits on the encoder:
`base_model_attribute` says to load it on `WhisperModel.from_pretrained(SOURCE, ...).encoder`.
`--merge` (LoRA only) folds LoRA into the weights and writes `backbone/`, a standalone Hugging Face folder
(`ASTModel.from_pretrained`, `--backbone_source`) with the trained final norm and the adapted grid;
`trained.safetensors` then holds the head alone and `hyperparams.yaml` runs that backbone unchanged.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .atomic import follow_umask, staging_folder, write_json_atomic
from .backbones import DEFAULT_SOURCES, BackboneLoadError
from .hparams_loader import HparamsError, plain_options
from .inference import TRAINED_FILE, AudioClassifier, save_trainable, write_inference_folder
from .methods import LoRALinear
from .model import PETLModel
from .run_folder import EXPORT_INFO, InferenceError, is_export, locate_run, read_tree

FORMATS = ("speechbrain", "peft")
MERGED_BACKBONE = "backbone"
CHECKPOINT_BOOKKEEPING = ("epoch", "end-of-epoch", "unixtime")  # CKPT.yaml keys that are no metric
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
POSITION_FILE = "position_embeddings.safetensors"  # `Backbone.adapted_checkpoint`'s tensors (AST's grid)
# The merged export: the plain backbone of <pretrained_path>/backbone, no method, the head's tensors only.
MERGED_REPLACEMENTS = (
    f"method: !new:petl_modules.methods.LinearProbing\nbackbone_source: !ref <pretrained_path>/{MERGED_BACKBONE}\n"
)


# --- provenance -------------------------------------------------------------------------------------


_FOLDER_HASHES: dict[tuple, str] = {}


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the names and bytes of a folder's files (sorted), as the revision of a local backbone.

    Remembered for the process by the files' names, inodes, sizes and change and modification times, so that
    loading many tasks of one backbone, or exporting many runs of it, reads its files once; a rewritten or
    replaced file hashes anew.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stats = [path.stat() for path in files]
    key = (
        str(folder.resolve()),
        tuple((p.name, s.st_ino, s.st_size, s.st_ctime_ns, s.st_mtime_ns) for p, s in zip(files, stats)),
    )
    if key not in _FOLDER_HASHES:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _FOLDER_HASHES[key] = digest.hexdigest()
    return _FOLDER_HASHES[key]


def backbone_revision(source: str) -> dict:
    """A local folder: its path and content hash; a hub id: the commit of the cached snapshot, if any."""
    path = Path(source).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), "sha256": folder_sha256(path)}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 - the commit is informative only
        cached = None
    return {"id": source, "commit": Path(cached).parent.name if isinstance(cached, str) else None}


def input_settings(model: PETLModel) -> dict:
    return model.backbone.input_settings()


def lora_summary(model: PETLModel) -> dict | None:
    """Rank, effective scale and dropout as the LoRA modules hold them (never recomputed from options)."""
    layers = model.lora_layers()
    if not layers:
        return None
    ranks = sorted({layer.lora.lora_A.out_features for layer in layers})
    scales = sorted({float(layer.lora.scale) for layer in layers})
    dropouts = sorted({float(layer.lora.dropout.p) for layer in layers})
    single = lambda values: values[0] if len(values) == 1 else values  # noqa: E731
    return {"layers": len(layers), "rank": single(ranks), "scale": single(scales), "dropout": single(dropouts)}


# --- LoRA-specific forms ------------------------------------------------------------------------------


def unwrap_lora(module: torch.nn.Module) -> dict[str, LoRALinear]:
    """Put each LoRALinear's frozen Linear back in its place; returns the LoRA layers by module name."""
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, LoRALinear)}
    for name, layer in layers.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attribute, layer.base)
    return layers


def write_merged_backbone(model: PETLModel, folder: Path) -> None:
    """LoRA folded into the weights; the backbone saved as a Hugging Face folder with its preprocessor config.

    Its files have mode 0666 & ~umask and the folder 0777 & ~umask (not transformers' private 0600 files).
    """
    backbone = model.backbone
    model.merge_lora()
    unwrap_lora(backbone.model)
    backbone.model.save_pretrained(folder)
    follow_umask(folder)  # transformers writes model.safetensors 0600
    write_json_atomic(folder / "preprocessor_config.json", backbone.preprocessor_config())


def write_peft_adapter(model: PETLModel, folder: Path, source: str) -> dict:
    """PEFT's LoRA adapter of the backbone (and the trained tensors it holds besides); returns how to load it.

    Its files in `folder` have mode 0666 & ~umask (not safetensors' private 0600).
    """
    import peft

    backbone = model.backbone
    hf_model = copy.deepcopy(backbone.model)
    layers = unwrap_lora(hf_model)
    summary = lora_summary(model)
    if any(isinstance(summary[key], list) for key in ("rank", "scale", "dropout")):
        raise InferenceError(f"--format peft: the LoRA layers differ in rank, scale or dropout ({summary})")
    # Trained tensors of the Hugging Face model outside LoRA (final LayerNorm, ...): their modules travel whole.
    owners = sorted({name.rpartition(".")[0] for name, p in hf_model.named_parameters() if p.requires_grad})
    names = [name for name, _ in hf_model.named_modules()]
    for owner in owners:  # PEFT picks modules_to_save by name suffix: each must name its module alone
        if sum(name.endswith(owner) for name in names) != 1:
            raise InferenceError(
                f"--format peft: PEFT cannot save the trained module '{owner}' alone (other modules' names end "
                "with it); use --merge instead"
            )
    base_kwargs = {}
    adapted = backbone.adapted_checkpoint()
    if adapted is not None:
        # What the backbone changed in its checkpoint (AST: the positional grid carried over to target_length)
        # travels as a file of its own, because PEFT's modules_to_save cannot name AST's `embeddings` without
        # its `patch_embeddings`; the base model is built with the changed config values.
        tensors, changed_config = adapted
        save_trainable(tensors, folder / POSITION_FILE)
        base_kwargs = {**changed_config, "ignore_mismatched_sizes": True}
    config = peft.LoraConfig(
        r=summary["rank"],
        lora_alpha=summary["scale"] * summary["rank"],
        lora_dropout=summary["dropout"],
        target_modules=sorted(layers),
        modules_to_save=owners or None,
        bias="none",
    )
    peft_model = peft.get_peft_model(hf_model, config)
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora.lora_B.weight)
    peft_model.peft_config["default"].base_model_name_or_path = source
    with tempfile.TemporaryDirectory(dir=folder) as staging:  # PEFT also writes a model card: keep its two files
        peft_model.save_pretrained(staging)
        for name in PEFT_FILES:
            os.replace(follow_umask(Path(staging) / name), folder / name)  # safetensors writes 0600
    return {
        "base_model": source,
        "base_model_class": backbone.checkpoint_class,
        "base_model_attribute": backbone.checkpoint_attribute,  # Whisper: the adapter sits on `.encoder`
        "base_model_kwargs": base_kwargs,
        "modules_to_save": owners,
        "position_embeddings": POSITION_FILE if base_kwargs else None,
        "lora_alpha": config.lora_alpha,
        "r": config.r,
    }


# --- the export ------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"--out {out}: exists and is not an empty folder; choose a new folder")


def export(
    run: str | Path, out: str | Path, format: str = "speechbrain", merge: bool = False, overrides: dict | None = None
) -> dict:
    """Write the export folder `out` from the run in `run`; returns the content of its export.json.

    Invariants: `out` appears whole or not at all (built in a staging folder beside it, removed on failure);
    every file in it has mode 0666 & ~umask and every folder 0777 & ~umask.
    """
    if format not in FORMATS:
        raise InferenceError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if merge and format == "peft":
        raise InferenceError("--merge and --format peft exclude each other: a merged backbone has no adapter left")
    out = Path(out).expanduser().resolve()
    _check_out(out)
    if is_export(Path(run).expanduser()):
        raise InferenceError(f"--run {run}: already an export; give the recipe run folder it came from")
    trained = locate_run(run)
    tree = read_tree(trained.hparams_file)
    overrides = dict(overrides or {})
    tree.update(overrides)
    classifier = AudioClassifier.from_hparams(
        trained.folder, overrides=overrides, freeze_params=False, run_opts={"device": "cpu"}
    )
    model: PETLModel = classifier.mods.model
    hparams = classifier.hparams
    method = model.method.display_name
    lora = lora_summary(model)
    if (merge or format == "peft") and lora is None:
        option = "--merge" if merge else "--format peft"
        raise InferenceError(f"{option}: only LoRA runs have that form; {trained.folder} trained '{method}'")
    if format == "peft" and not model.backbone.peft_lora_acts:
        raise InferenceError(
            f"--format peft: PEFT's LoRA does not act on {type(model.backbone.model).__name__} (its attention reads "
            "the projections' weights directly); use --merge for a standalone Hugging Face folder instead"
        )
    groups = model.trainable_parameter_groups()
    state = model.trainable_state_dict()
    kind = str(hparams.backbone)
    source = str(hparams.backbone_source or DEFAULT_SOURCES[kind])
    info = {
        "format": format,
        "merged": merge,
        "method": method,
        "method_options": plain_options(tree, "method"),
        "lora": lora,
        "backbone": {
            "kind": kind,
            "source": source,
            "revision": backbone_revision(source),
            "parameters": model.backbone_parameters(),
        },
        "input": input_settings(model),
        "num_classes": len(classifier.classes),
        "classes": classifier.classes,
        "trainable_parameters": sum(groups.values()),
        "trainable_groups": groups,
        "run": {
            "folder": str(trained.folder),
            "checkpoint": str(trained.checkpoint),
            "epoch": trained.meta.get("epoch"),
            "valid": {key: trained.meta[key] for key in trained.meta if key not in CHECKPOINT_BOOKKEEPING},
            "git_revision": trained.git_revision,
        },
    }
    staging = staging_folder(out)  # 0777 & ~umask, as `out` will be
    try:
        header = f"# Inference hyperparameters of {trained.folder} (python -m petl_modules.export).\n"
        if merge:
            write_merged_backbone(model, staging / MERGED_BACKBONE)
            state = {name: tensor for name, tensor in state.items() if not name.startswith("backbone.model.")}
            write_inference_folder(
                staging,
                tree,
                classifier.classes,
                replacements=MERGED_REPLACEMENTS,
                strict=False,
                header=header,
                pretrained_path=out,
            )
        else:
            write_inference_folder(staging, tree, classifier.classes, header=header, pretrained_path=out)
        save_trainable(state, staging / TRAINED_FILE)
        if format == "peft":
            info["peft"] = write_peft_adapter(model, staging, source)
        info["files"] = {
            str(path.relative_to(staging)): path.stat().st_size for path in sorted(staging.rglob("*")) if path.is_file()
        }
        write_json_atomic(staging / EXPORT_INFO, info)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


USER_ERRORS = (InferenceError, HparamsError, BackboneLoadError)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m petl_modules.export", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--run", required=True, help="a recipe run folder, or its output folder with one run")
    parser.add_argument("--out", required=True, help="the export folder to create (absent or empty)")
    parser.add_argument("--format", default="speechbrain", choices=FORMATS, help="peft: add a PEFT LoRA adapter")
    parser.add_argument("--merge", action="store_true", help="LoRA: write backbone/ with LoRA merged in")
    parser.add_argument("--backbone_source", help="where the frozen backbone is now, if it moved since training")
    args = parser.parse_args(argv)
    overrides = {"backbone_source": args.backbone_source} if args.backbone_source else {}
    try:
        info = export(args.run, args.out, args.format, args.merge, overrides)
    except USER_ERRORS as error:
        sys.exit(f"export: error: {error}")
    print(f"exported {info['method']} ({info['trainable_parameters']:,} trainable parameters) to {args.out}")
    for name, size in info["files"].items():
        print(f"  {name}  {size:,} bytes")
    return info


if __name__ == "__main__":
    main()
