"""HyperPyYAML with composition: a file may `extends:` other files, whose keys it inherits.

    # recipes/FSC/hparams/soft_moa.yaml
    extends:
        - ../../../petl_modules/hparams/methods/soft_moa.yaml
        - fsc.yaml

Keys are merged top-level (later files, then the file itself, win), so every key of every block is a
top-level key: `!ref <lr>` works across blocks and `--lr=0.01` overrides it from the command line.
An override that names no key is an error naming the key and the file.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml

LIBRARY_HPARAMS = Path(__file__).resolve().parent / "hparams"


class HparamsError(ValueError):
    """A hyperparameter file or override is wrong; the message names the file and key."""


def _yaml() -> ruamel.yaml.YAML:
    return ruamel.yaml.YAML()


def compose(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The merged, unresolved tree of `path` and everything it extends (tags kept for HyperPyYAML)."""
    path = Path(path).resolve()
    if path in _seen:
        raise HparamsError(f"{path}: 'extends' loops back to this file")
    if not path.is_file():
        raise HparamsError(f"hyperparameter file not found: {path}")
    try:
        tree = _yaml().load(path.read_text())
    except ruamel.yaml.YAMLError as error:
        raise HparamsError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    tree = tree if tree is not None else {}
    bases = tree.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = ruamel.yaml.comments.CommentedMap()
    for base in bases:
        merged.update(compose(path.parent / base, _seen + (path,)))
    merged.update(tree)
    return merged


def parse_overrides(overrides: str | dict | None) -> dict:
    """Overrides as a dict: SpeechBrain's YAML string (`key: value` lines) or a dict."""
    if not overrides:
        return {}
    if not isinstance(overrides, str):
        return dict(overrides)
    try:
        return dict(_yaml().load(overrides) or {})
    except ruamel.yaml.YAMLError as error:
        raise HparamsError(
            "command-line options are not valid YAML values or repeat an option "
            f"({str(error).strip().splitlines()[-1]})"
        ) from None


def check_overrides(tree: dict, overrides: dict, path: str | Path) -> None:
    """Every override must name a key of the composed file: a typo must not be silently ignored."""
    unknown = sorted(set(overrides) - set(tree))
    if unknown:
        raise HparamsError(f"unknown option --{unknown[0]}: not a key of {path} or of the files it extends")


def load_hparams(path: str | Path, overrides: str | dict | None = None, defaults: tuple[str | Path, ...] = ()) -> dict:
    """Compose `defaults` then `path`, apply `overrides` (a dict or SpeechBrain's YAML string), resolve.

    Returns the loaded hyperparameters (objects instantiated), as `load_hyperpyyaml` does.
    """
    tree = ruamel.yaml.comments.CommentedMap()
    for default in defaults:
        tree.update(compose(default))
    tree.update(compose(path))
    overrides = parse_overrides(overrides)
    check_overrides(tree, overrides, path)
    stream = StringIO()
    _yaml().dump(tree, stream)
    stream.seek(0)
    return load_hyperpyyaml(stream, overrides)
