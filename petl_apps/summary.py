"""Parameter summary of a model declared in HyperPyYAML, without data or training.

    python -m petl_apps.summary HPARAMS.yaml [--key=value ...] [--json]

Works on a recipe's file (recipes/<DS>/hparams/<method>.yaml, no data needed) and on a method block alone
(petl_modules/hparams/methods/*.yaml), which is completed with the library's model block.
"""

from __future__ import annotations

import json
import sys
import tempfile

from petl_modules.backbones.loading import BackboneLoadError
from petl_modules.hparams_loader import LIBRARY_HPARAMS, HparamsError, compose, load_hparams
from petl_modules.methods.adapter import AdaptedSublayer
from petl_modules.model import PETLModel


def summarize(model: PETLModel, method_name: str | None = None) -> dict:
    """Backbone and trainable parameter counts, by group, and their share of the backbone.

    The method alone excludes the sub-layer LayerNorms trained beside it (`sublayer_norm_params`), as the
    papers' percentages do. LoRA models also report the effective scale of their updates (`lora_scale`);
    adapters and mixtures the sub-layers they sit beside (`adapted_sublayers`: MHSA, FFN or both).
    """
    backbone = model.backbone_parameters()
    groups = model.trainable_parameter_groups()
    trainable = sum(groups.values())
    lora = model.lora_layers()
    extra = {"lora_scale": lora[0].lora.scale} if lora else {}  # one method: every layer has the same scale
    first_layer = model.backbone.layers[0]
    names = {"MHSA": model.backbone.attention_name, "FFN": model.backbone.ffn_name}
    adapted = [label for label, name in names.items() if isinstance(getattr(first_layer, name), AdaptedSublayer)]
    extra |= {"adapted_sublayers": adapted} if adapted else {}
    return {
        "method": method_name or model.method.name,
        "backbone": type(model.backbone).__name__,
        "backbone_params": backbone,
        "trainable_params": trainable,
        "trainable_percent": 100 * trainable / backbone,
        "method_params": groups["method"],
        "method_percent": 100 * groups["method"] / backbone,
        "head_params": groups["head"],
        "final_norm_params": groups["final_norm"],
        "sublayer_norm_params": groups["sublayer_norm"],
        **extra,
    }


def split_arguments(argv: list[str]) -> tuple[str, dict, bool]:
    """HPARAMS.yaml, the --key=value overrides (YAML values) and --json."""
    files = [arg for arg in argv if not arg.startswith("--")]
    if len(files) != 1:
        raise HparamsError("usage: python -m petl_apps.summary HPARAMS.yaml [--key=value ...] [--json]")
    overrides, as_json = {}, False
    for arg in argv:
        if arg == "--json":
            as_json = True
        elif arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise HparamsError(f"option {arg} needs a value: --{key}=VALUE")
            overrides[key] = value
    return files[0], overrides, as_json


def load_hparams_with_model(path: str, overrides: dict) -> dict:
    """The hyperparameters of `path`, completed with the library's model block when it has no model.

    A recipe's placeholders (data and output folders) point to a scratch folder: no data is needed, and
    whatever the file builds besides the model (checkpointer, loggers) writes nothing that outlives us.
    """
    tree = compose(path)
    defaults = () if "model" in tree else (LIBRARY_HPARAMS / "model.yaml",)
    placeholders = [
        key
        for key, node in tree.items()
        if getattr(getattr(node, "tag", None), "value", None) == "!PLACEHOLDER" and key not in overrides
    ]
    with tempfile.TemporaryDirectory() as scratch:
        values = {**{key: scratch for key in placeholders}, **overrides}
        yaml_overrides = "\n".join(f"{key}: {value}" for key, value in values.items())
        return load_hparams(path, yaml_overrides, defaults=defaults)


def main(argv: list[str] | None = None) -> int:
    try:
        path, overrides, as_json = split_arguments(sys.argv[1:] if argv is None else argv)
        hparams = load_hparams_with_model(path, overrides)
        summary = summarize(hparams["model"], hparams.get("method_name"))
    except (HparamsError, BackboneLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['method']} on {summary['backbone']}")
    print(f"  backbone parameters   {summary['backbone_params']:>12,}")
    for group in ("method", "final_norm", "sublayer_norm", "head"):
        print(f"  trainable: {group:<13} {summary[group + '_params']:>9,}")
    if "lora_scale" in summary:
        print(f"  LoRA scale            {summary['lora_scale']:>12}")
    if "adapted_sublayers" in summary:
        print(f"  beside sub-layers     {' and '.join(summary['adapted_sublayers']):>12}")
    print(
        f"  trainable in all      {summary['trainable_params']:>12,}  "
        f"({summary['trainable_percent']:.3f} % of the backbone; method alone {summary['method_percent']:.3f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
