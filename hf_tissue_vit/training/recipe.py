"""YAML recipes (``--config``): a file of a script's flag names and values, read as argparse defaults that the
flags on the command line override; a nested ``augmentation:`` mapping is flattened."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


def load_recipe(parser: HfArgumentParser, path: str, script: str = "finetune.py") -> dict[str, Any]:
    """A YAML recipe as argparse defaults (keys = flag names of ``script``); a nested ``augmentation:`` mapping is
    flattened."""
    recipe = Path(path)
    if not recipe.is_file():
        raise FileNotFoundError(f"--config {path}: no such recipe file")
    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        # ValueError, not TypeError: a bad recipe is the user's to fix (cli.run_main reports ValueError)
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    values.update(values.pop("augmentation", None) or {})
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; keys must be {script} flag names")
    values.pop("config", None)
    actions = {action.dest: action for action in parser._actions}
    return {key: _recipe_value(path, key, value, actions[key]) for key, value in values.items()}


def _recipe_value(path: str, key: str, value: Any, action: Any) -> Any:
    """A recipe value converted with its flag's type (argparse leaves non-string defaults as they are, so a
    wrong type would surface later under the flag's name only); ValueError naming the recipe key."""
    if value is None:
        return None
    many = action.nargs in ("+", "*")
    items = value if isinstance(value, list) else [value]
    try:
        if isinstance(value, dict) or (isinstance(value, list) and not many):
            raise ValueError("expected a single value")
        if isinstance(value, float) and action.type is int and not value.is_integer():
            raise ValueError("expected a whole number")
        converted = [action.type(item if isinstance(item, str) else str(item)) if action.type else item
                     for item in items]
        if action.choices is not None and any(item not in action.choices for item in converted):
            raise ValueError(f"expected one of {list(action.choices)}")
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        kind = ("choice" if action.choices is not None else "true/false" if action.type is string_to_bool
                else getattr(action.type, "__name__", "value"))
        raise ValueError(f"--config {path}: key {key}: {value!r} is not a valid {kind} for --{action.dest} "
                         f"({err})") from None
    return converted if many else converted[0]


def config_flag(argv: list[str]) -> str | None:
    """The value of the last ``--config`` in ``argv`` (``--config X`` or ``--config=X``), or None."""
    config = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
    return config
