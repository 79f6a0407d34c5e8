"""HyperPyYAML with composition: a file may `extends:` other files, whose keys it inherits.

    # recipes/FSC/hparams/soft_moa.yaml
    extends:
        - ../../../petl_modules/hparams/methods/soft_moa.yaml
        - fsc.yaml

Keys are merged top-level (later files, then the file itself, win), so every key of every block is a
top-level key: `!ref <lr>` works across blocks and `--lr=0.01` overrides it from the command line.

Invariants:
- `compose_tree(path, overrides)` is the one tree that runs: the composed files with the overrides merged as
  HyperPyYAML merges them (a nested mapping updates the mapping it names, its other keys stay). Its YAML text
  (`dump_tree`) has no `extends:` and loads with plain `hyperpyyaml.load_hyperpyyaml` to the same objects
  that `load_hparams` returns: it is what `python -m petl_modules.flatten` prints and what a recipe records.
- A key keeps the kind of value its file gives it, from a file or the command line: a YAML boolean only ever
  receives a YAML boolean (`no`, `off`, `"False"` are strings, not booleans), an integer an integer, a number a
  number (or null), and an object the file builds (`!new:`, `!name:`: the model, the method) is never replaced
  by a plain value. Anything else is an error naming the key. Ranges are checked by `hparams_checks`.
- An override that names no key, a missing `extends:` entry, a loop: an error naming the key or the entry
  and the file that holds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from io import StringIO
from pathlib import Path

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from ruamel.yaml.constructor import DuplicateKeyError

LIBRARY_HPARAMS = Path(__file__).resolve().parent / "hparams"
PLACEHOLDER_TAG = "!PLACEHOLDER"


class HparamsError(ValueError):
    """A hyperparameter file or override is wrong; the message names the file and key."""


def _yaml() -> ruamel.yaml.YAML:
    yaml = ruamel.yaml.YAML()
    yaml.width = 4096  # one line per flow mapping: no line breaks inside `!ref <key>`
    return yaml


def merge(tree: dict, update: Mapping, where: str, deep: bool = False, prefix: str = "") -> None:
    """Merge `update` into `tree` in place, keeping booleans boolean.

    Files merge top-level (a key replaces the key); overrides merge `deep`, as HyperPyYAML merges them (a
    mapping updates the mapping it names, key by key). `where` prefixes the key in an error ("FILE: " for a
    file, "--" for the command line).
    """
    for key, value in update.items():
        old = tree.get(key)
        if deep and isinstance(value, Mapping) and isinstance(old, Mapping) and not _tag(value) and not _tag(old):
            merge(old, value, where, deep, f"{prefix}{key}.")
            continue
        _check_kind(old, value, f"{where}{prefix}{key}")
        tree[key] = value


OBJECT_TAGS = ("!new:", "!name:")


def _check_kind(old: object, value: object, name: str) -> None:
    """Whether a plain `value` may replace `old` (see the module's invariants); an error naming the key if not."""
    if _tag(value) is not None:  # an expression (`!ref`, `!apply:`, an object): checked once resolved
        return
    if str(_tag(old)).startswith(OBJECT_TAGS):
        hint = ": a method is chosen by its file, hparams/<method>.yaml" if name.endswith("method") else ""
        raise HparamsError(f"{name} is an object the file builds ({_tag(old)}); not a value to set{hint}")
    if _tag(old) is not None or old is None or value is None:  # an expression or null: checked once resolved
        return
    if isinstance(old, bool):
        if not isinstance(value, bool):
            raise HparamsError(f"{name} must be a YAML boolean (True or False), got {_text(value)!r}")
    elif isinstance(old, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise HparamsError(f"{name} must be an integer, got {_text(value)!r}")
    elif isinstance(old, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise HparamsError(f"{name} must be a number, got {_text(value)!r}")


def _tag(node: object) -> str | None:
    """The explicit tag of a ruamel node (`!new:...`, `!ref`, `!PLACEHOLDER`), None for plain values."""
    tag = getattr(node, "tag", None)
    value = getattr(tag, "value", None)
    return value if isinstance(value, str) and value.startswith("!") else None


def _text(value: object) -> str:
    return str(getattr(value, "value", value))


def compose(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The merged, unresolved tree of `path` and everything it extends (tags kept for HyperPyYAML)."""
    path = Path(path).resolve()
    if path in _seen:
        raise HparamsError(f"{path}: 'extends' loops back to this file")
    if not path.is_file():
        raise HparamsError(f"hyperparameter file not found: {path}")
    try:
        tree = _yaml().load(path.read_text(encoding="utf-8"))
    except ruamel.yaml.YAMLError as error:
        raise HparamsError(f"{_position(path, error)}: not valid YAML ({_problem(error)})") from None
    tree = tree if tree is not None else ruamel.yaml.comments.CommentedMap()
    if not isinstance(tree, Mapping):
        raise HparamsError(f"{path}: expected a mapping of keys to values at the top level")
    bases = tree.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = ruamel.yaml.comments.CommentedMap()
    for base in bases:
        base_path = (path.parent / str(base)).resolve()
        if not base_path.is_file():
            raise HparamsError(
                f"{path}: extends entry {str(base)!r} not found (looked for {base_path}); "
                "entries are relative to the file that holds them"
            )
        merge(merged, compose(base_path, _seen + (path,)), f"{base_path}: ")
    merge(merged, tree, f"{path}: ")
    return merged


def parse_overrides(overrides: str | Mapping | None) -> dict:
    """Overrides as a dict: SpeechBrain's YAML string (`key: value` lines) or a dict."""
    if not overrides:
        return {}
    if not isinstance(overrides, str):
        return dict(overrides)
    try:
        return dict(_yaml().load(overrides) or {})
    except DuplicateKeyError as error:
        key = re.search(r'duplicate key "([^"]*)"', str(error.problem))
        raise HparamsError(f"--{key.group(1) if key else '?'} is given more than once; keep one") from None
    except ruamel.yaml.YAMLError as error:
        raise HparamsError(f"command-line options are not valid YAML values ({_problem(error)})") from None


def _position(path: Path, error: ruamel.yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN` of a YAML error (1-based), `FILE` when the parser gives no position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _problem(error: ruamel.yaml.YAMLError) -> str:
    """The parser's reason on one line, e.g. `while parsing a flow sequence (line 2, column 5): expected ',' or
    ']', but got ':'`, without its excerpt of the text.
    """
    context, problem = getattr(error, "context", None), getattr(error, "problem", None)
    mark = getattr(error, "context_mark", None)
    if context and mark is not None:
        context = f"{context} (line {mark.line + 1}, column {mark.column + 1})"
    text = ": ".join(str(part) for part in (context, problem) if part) or str(error).strip().splitlines()[0]
    return " ".join(text.split())


def check_overrides(tree: Mapping, overrides: Mapping, path: str | Path) -> None:
    """Every override must name a key of the composed file: a typo must not be silently ignored."""
    unknown = sorted(set(overrides) - set(tree))
    if unknown:
        raise HparamsError(f"unknown option --{unknown[0]}: not a key of {path} or of the files it extends")


def compose_tree(
    path: str | Path, overrides: str | Mapping | None = None, defaults: tuple[str | Path, ...] = ()
) -> dict:
    """The tree that runs: `defaults`, then `path` (with what it extends), then the overrides merged."""
    tree = ruamel.yaml.comments.CommentedMap()
    for default in defaults:
        merge(tree, compose(default), f"{default}: ")
    merge(tree, compose(path), f"{path}: ")
    overrides = parse_overrides(overrides)
    check_overrides(tree, overrides, path)
    merge(tree, overrides, "--", deep=True)
    return tree


def dump_tree(tree: Mapping, header: str = "") -> str:
    """The tree as one self-contained YAML text (tags kept), with `header` lines as comments on top."""
    stream = StringIO()
    _yaml().dump(tree, stream)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + stream.getvalue()


def placeholders(tree: Mapping) -> list[str]:
    """Top-level keys still marked `!PLACEHOLDER` (to be given in a file or on the command line)."""
    return [key for key, value in tree.items() if _tag(value) == PLACEHOLDER_TAG]


def load_tree(tree: Mapping) -> dict:
    """Resolve and instantiate a composed tree exactly as plain `load_hyperpyyaml` loads its dump."""
    return load_hyperpyyaml(StringIO(dump_tree(tree)))


def load_hparams(
    path: str | Path, overrides: str | Mapping | None = None, defaults: tuple[str | Path, ...] = ()
) -> dict:
    """Compose `defaults` then `path`, apply `overrides` (a dict or SpeechBrain's YAML string), resolve.

    Returns the loaded hyperparameters (objects instantiated), as `load_hyperpyyaml` does.
    """
    return load_tree(compose_tree(path, overrides, defaults))


# --- reading a tree: plain values, resolved settings, differences, what a key needs ----------------------

REFERENCE = re.compile(r"!(?:ref|copy)\s+([^\n]*)")
NAME = re.compile(r"<([^<>\[\]./\s]+)")


def load_yaml(path: str | Path) -> dict:
    """One YAML file as a tree (tags kept, `extends:` not followed), e.g. a run's recorded hyperparams.yaml."""
    return _yaml().load(Path(path).read_text(encoding="utf-8")) or {}


def plain(node: object) -> object:
    """A ruamel tree as plain Python (comments dropped; a tagged node becomes [tag, value]), for comparison.

    The one converter from YAML nodes to Python values; `is_expression` tells the tagged ones.
    """
    tag = _tag(node)
    if isinstance(node, Mapping):
        value = {str(key): plain(item) for key, item in node.items()}
    elif isinstance(node, list):
        value = [plain(item) for item in node]
    elif isinstance(node, bool | None):
        return node
    elif isinstance(node, int):
        value = int(node)
    elif isinstance(node, float):
        value = float(node)
    else:
        value = str(getattr(node, "value", node))
    return [tag, value] if tag is not None else value


def is_expression(value: object) -> bool:
    """A value `plain` left as `[tag, value]`: an `!apply:`, `!ref` or object the files build."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0].startswith("!")


def resolved_settings(tree: Mapping) -> dict:
    """The top-level scalar values of a composed tree with every `!ref` resolved (nothing instantiated)."""
    resolved = _yaml().load(resolve_references(StringIO(dump_tree(tree))).getvalue()) or {}
    return {key: plain(value) for key, value in resolved.items() if not isinstance(plain(value), dict | list)}


def differing_keys(recorded: Mapping, wanted: Mapping) -> list[str]:
    """Keys whose values differ between two trees (as `plain` sees them)."""
    recorded, wanted = plain(recorded), plain(wanted)
    return sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))


def references(value: object) -> set[str]:
    """Top-level keys a YAML value refers to with `!ref <key...>` or `!copy <key...>`."""
    names: set[str] = set()
    for expression in REFERENCE.findall(dump_tree({"value": value})):
        names.update(NAME.findall(expression))
    return names


def closure(tree: Mapping, roots: Iterable[str]) -> list[str]:
    """The keys of `tree` that `roots` need (themselves included, transitively), in the tree's order."""
    needed: set[str] = set()
    pending = [root for root in roots if root in tree]
    while pending:
        key = pending.pop()
        if key not in needed:
            needed.add(key)
            pending.extend(name for name in references(tree[key]) if name in tree)
    return [key for key in tree if key in needed]


def value_of(tree: Mapping, key: str) -> object:
    """A top-level value of a composed tree, evaluated (`!ref`, `!apply:`) from the keys it needs alone."""
    return load_tree({name: tree[name] for name in closure(tree, [key])})[key]


def plain_options(tree: Mapping, root: str) -> dict:
    """The untagged scalar and list values `root` depends on (a method's options, for the record)."""
    options = {}
    for key in closure(tree, [root]):
        value = plain(tree[key])
        items = value if isinstance(value, list) and not is_expression(value) else [value]
        if not any(is_expression(item) or isinstance(item, dict | list) for item in items):
            options[key] = value
    return options
