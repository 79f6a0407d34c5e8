"""The ranges of the values users type, checked on a recipe's settings before anything is written.

`hparams_loader` keeps each key's kind (an integer stays an integer, a boolean a boolean); this adds what a
kind cannot say: an epoch count is positive, a dropout is a probability, a backbone is one of those built in.

    check_settings({"lr": "abc", ...})  ->  HparamsError: --lr must be a positive number; got 'abc'

Keys the table does not name are checked by the objects they configure (the methods' and the model's own option
checks, `OptionError`). A value still given as an expression (`!apply:...`, the files' per-backbone defaults)
is the files' own and is not checked here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .backbones import BACKBONES, WINDOWS
from .hparams_loader import HparamsError, is_expression
from .model import POOLINGS


@dataclass(frozen=True)
class Rule:
    """What a key accepts: `description` completes "--key must be ..."; `nullable` also accepts null."""

    description: str
    accepts: Callable[[object], bool]
    nullable: bool = False


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _integer(low: int, high: float = math.inf) -> Callable[[object], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


POSITIVE_INT = Rule("a positive integer", _integer(1))
NON_NEGATIVE_INT = Rule("an integer >= 0", _integer(0))
POSITIVE_NUMBER = Rule("a positive number", lambda value: _number(value) and value > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda value: _number(value) and value >= 0)
PROBABILITY = Rule("a number in [0, 1)", lambda value: _number(value) and 0 <= value < 1)


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda value: value in choices)


RULES: dict[str, Rule] = {
    # training.yaml
    "seed": Rule("an integer in [0, 2**32 - 1]", _integer(0, 2**32 - 1)),
    "number_of_epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "few_shot_samples": Rule(POSITIVE_INT.description, POSITIVE_INT.accepts, nullable=True),
    "lr": POSITIVE_NUMBER,
    "weight_decay": NON_NEGATIVE_NUMBER,
    "adam_eps": POSITIVE_NUMBER,
    "warmup_steps": NON_NEGATIVE_INT,
    "max_grad_norm": POSITIVE_NUMBER,  # .inf switches clipping off
    "freq_mask": NON_NEGATIVE_INT,
    "time_mask": NON_NEGATIVE_INT,
    "num_workers": NON_NEGATIVE_INT,
    # model.yaml
    "backbone": one_of(BACKBONES),
    "target_length": POSITIVE_INT,
    "whisper_window": one_of(WINDOWS),
    "num_classes": Rule("an integer >= 2", _integer(2), nullable=True),  # null: the data's (AudioFolder)
    "pooling": one_of(POOLINGS),
    # method blocks (hparams/methods/*.yaml), by their YAML names
    "reduction_rate": POSITIVE_INT,
    "reduction_rate_lora": POSITIVE_INT,
    "reduction_rate_moa": POSITIVE_INT,
    "alpha_lora": POSITIVE_NUMBER,
    "lora_dropout": PROBABILITY,
    "num_adapters": POSITIVE_INT,
    "num_slots": POSITIVE_INT,
    "kernel_size": POSITIVE_INT,
    "prompt_len": POSITIVE_INT,
    "prompt_dropout": PROBABILITY,
    "prefix_len": POSITIVE_INT,
    "num_trainable_layers": Rule(POSITIVE_INT.description, POSITIVE_INT.accepts, nullable=True),
}


def check_settings(settings: Mapping[str, object], rules: Mapping[str, Rule] = RULES) -> None:
    """Every key of `rules` present in `settings` (resolved top-level values) holds a value it accepts.

    Raises `HparamsError("--key must be ...; got VALUE")` for the first that does not.
    """
    for key, rule in rules.items():
        if key not in settings or is_expression(settings[key]):
            continue
        value = settings[key]
        if value is None and rule.nullable:
            continue
        if not rule.accepts(value):
            null = " or null" if rule.nullable else ""
            raise HparamsError(f"--{key} must be {rule.description}{null}; got {value!r}")
