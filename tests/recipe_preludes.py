"""Preludes for `recipe_helpers.run_recipes`: functions the recipe driver calls once before its command lines.

Each is called with no arguments in the driver's interpreter (so its patches hold for every command of that
run) and takes its settings from environment variables, which `run_recipes(..., env=...)` sets.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path


def count_backbone_forwards() -> None:
    """Count the files each backbone class's forward sees (the batch size); at exit write the totals, as JSON
    `{class name: files}`, to the file `$BACKBONE_COUNT`."""
    from petl_modules.backbones.ast import ASTBackbone
    from petl_modules.backbones.wav2vec2 import Wav2Vec2Backbone

    seen: dict[str, int] = {}

    def counting(cls: type) -> None:
        forward = cls.forward

        def counted(self, inputs, *args, **kwargs):
            seen[cls.__name__] = seen.get(cls.__name__, 0) + inputs.shape[0]
            return forward(self, inputs, *args, **kwargs)

        cls.forward = counted

    counting(ASTBackbone)
    counting(Wav2Vec2Backbone)
    atexit.register(lambda: Path(os.environ["BACKBONE_COUNT"]).write_text(json.dumps(seen)))


def count_steps_and_crash() -> None:
    """Append `Brain.step` at each training batch to the JSON list in the file `$CALLS`; while `$CRASH` is
    non-empty, raise KeyboardInterrupt at the 6th call (a run killed in epoch 2 of 4 steps per epoch, after its
    first step was checkpointed)."""
    from petl_modules.training import PETLBrain

    calls_file = Path(os.environ["CALLS"])
    original = PETLBrain.fit_batch

    def counted(self, batch):
        calls = json.loads(calls_file.read_text()) if calls_file.exists() else []
        calls.append(self.step)
        calls_file.write_text(json.dumps(calls))
        if os.environ.get("CRASH") and len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, batch)

    PETLBrain.fit_batch = counted
