"""Dataclass fields that carry their help text and command-line options, so that one string feeds
the API docstring and ``hf-wsvd compress --help``, and the type checks their values share;
importable without torch."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import field
from typing import Any


def recipe_field(default: Any, help: str, **cli: Any) -> Any:
    """A field whose metadata holds its ``help`` text and its argparse options ``cli`` (``type``,
    ``choices``, ``action``) for ``hf-wsvd compress``."""
    return field(default=default, metadata={"help": help, "cli": cli})


def field_of(owner: type, name: str) -> Any:
    """A field with the default, help and command-line options of ``owner``'s field ``name``: the
    recipe repeats a method's option (or a calibration setting) without writing its help twice."""
    [source] = [f for f in dataclasses.fields(owner) if f.name == name]
    return field(default=source.default, metadata=source.metadata)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (a bool is not, though Python counts it as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The largest count (samples, steps, batch sizes) the recipes and flags take: C's 32-bit int. Past
# sys.maxsize tqdm and islice fail in their own words after the statistics; well below it a run
# would go on for ever or fill memory before its first progress bar.
MAX_COUNT = 2**31 - 1


def is_count(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer from ``least`` to ``MAX_COUNT``."""
    return is_integer(value) and least <= value <= MAX_COUNT


def check_count(name: str, value: Any, least: int, meaning: str = "") -> None:
    """Raise a one-line ValueError naming ``name`` unless ``value`` is a count from ``least`` to
    ``MAX_COUNT``; ``meaning`` (e.g. "(0: off)") follows the range in the message."""
    if not is_count(value, least):
        raise ValueError(f"{name}={value!r} must be an integer from {least} to {MAX_COUNT}"
                         + (f" {meaning}" if meaning else ""))


def is_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or a ``float`` (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plain_numbers(instance: Any) -> None:
    """Set each field of the dataclass ``instance`` holding another type's number or truth value (a
    numpy scalar), alone or as a value of a dict (``max_kept_ratio_for_speed``, ``ranks``), to the
    built-in ``int``, ``float`` or ``bool`` of its value, which the checks and the JSON recipe take;
    a float32 as it prints (0.8, not 0.800000011920929)."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if isinstance(value, dict):
            plain = {key: _plain(item) for key, item in value.items()}
            if any(plain[key] is not item for key, item in value.items()):
                setattr(instance, f.name, plain)
        elif (plain := _plain(value)) is not value:
            setattr(instance, f.name, plain)


def _plain(value: Any) -> Any:
    """``value`` as a built-in ``int``, ``float`` or ``bool`` where it is another type's number or
    truth value; else ``value`` itself."""
    if type(value) in (int, float, bool):
        return value
    if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "ndim", None) == 0:
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            return float(str(value))
        except ValueError:  # a Real whose text is no float literal (a Fraction's "1/2")
            return float(value)
    return value