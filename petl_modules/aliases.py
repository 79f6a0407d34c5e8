"""The command names the applications had before they moved to `petl_apps`, kept working.

    python -m petl_modules.report ...   runs   python -m petl_apps.report ...

`ALIASES` maps each old module name to its new one. A finder on `sys.meta_path` (installed when `petl_modules`
is imported) loads the new module's file under the old name, so old command lines and imports keep working.
Nothing is imported until an old name is asked for: the library itself never imports an application.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

ALIASES = {
    **{
        f"petl_modules.{name}": f"petl_apps.{name}"
        for name in ("benchmark", "demo", "pretrain", "recipe_timing", "report", "summary", "sweep")
    },
    "petl_modules.checkpoints": "petl_modules.random_backbones",
}


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name of `ALIASES` as the file of its new module."""

    def find_spec(self, fullname, path, target=None) -> importlib.machinery.ModuleSpec | None:
        new_name = ALIASES.get(fullname)
        if new_name is None:
            return None
        spec = importlib.util.find_spec(new_name)
        return None if spec is None else importlib.util.spec_from_file_location(fullname, spec.origin)


def install() -> None:
    """Put the finder on `sys.meta_path` once (after the standard finders: a real module always wins)."""
    if not any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(AliasFinder())
