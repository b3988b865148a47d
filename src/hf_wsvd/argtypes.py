"""Command-line value types (argparse ``type=`` functions), importable without torch so that the
``hf-wsvd`` parser answers ``--help`` and argument errors at once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .fields import MAX_COUNT


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} is too large (at most {MAX_COUNT})")
    return value


def fraction(text: str, name: str = "param ratio") -> float:
    """A number in (0, 1]: a fraction of parameters kept."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{name} {value} is outside (0, 1]: it is a fraction of each layer's parameters kept"
        )
    return value


def comma_list(text: str) -> list[str]:
    """A comma-separated list of names (``sentence1,sentence2``; a trailing comma is allowed), none
    of them empty."""
    parts = text.split(",")
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    if not all(part.strip() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} holds an empty name: give comma-separated names (a,b)")
    return parts


def names(text: str) -> list[str] | str:
    """Module names or suffixes, comma-separated (``query,value``), or one regular expression
    (``layers\\.0\\..*``: a value with a regex operator and no comma; a dot alone is part of a name)."""
    if "," not in text and any(c in text for c in "*+?[](){}|\\^$"):
        return text
    return comma_list(text)


def speed_limit(text: str) -> float | dict[str, float]:
    """A kept-ratio number, or per-shape limits: a {"INxOUT": limit} JSON object, given inline or in
    a JSON file (which may also be a ``benchmarks/layer_speed.py --json-out`` measurement, whose
    ``by_shape`` is read)."""
    inline = text.lstrip().startswith("{")
    if not inline and not text.lower().endswith(".json"):
        return fraction(text, "max kept ratio for speed")
    try:
        payload = json.loads(text if inline else Path(text).read_text())
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"cannot read per-shape speed limits from {text!r}: {error}")
    table = payload.get("by_shape", payload) if isinstance(payload, dict) else None
    if not isinstance(table, dict) or not table or not all(isinstance(v, (int, float)) for v in table.values()):
        raise argparse.ArgumentTypeError(
            f"{text!r} holds no per-shape limits: expected the JSON written by benchmarks/layer_speed.py "
            "--json-out (one measurement, with 'by_shape') or a {\"INxOUT\": limit} mapping")
    return table


def hub_model_id(text: str) -> str:
    """A Hub repository id (``name`` or ``user/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repository id (name or user/name: letters, digits, "
                                         "'-', '_' and '.')") from None
    return text


def hub_dataset(text: str) -> tuple[str, str | None]:
    """``HUB_ID[:CONFIG]`` (``nyu-mll/glue:sst2``): a Hub dataset id and its configuration, if any."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    dataset, _, config = text.partition(":")
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub dataset id (name or user/name, then "
                                         ":CONFIG if it has configurations)") from None
    if ":" in text and not config:
        raise argparse.ArgumentTypeError(f"{text!r} names no configuration after ':'")
    return dataset, config or None
