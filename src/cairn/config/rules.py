"""The rules every config section checks itself with: choices read from `Literal` types, ranges,
durations. One message shape: the field, what is wrong, what to set."""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import field, fields
from typing import Any, Literal, Optional

from cairn.util.errors import CairnError, option


def opt(default: Any, help: str) -> Any:
    """A config field and its `--help` text."""
    return field(default=default, metadata={"help": help})


def _qual(section: Optional[str], name: str) -> str:
    return f"{section}.{name}" if section else name


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _choices(tp: Any) -> Optional[tuple]:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choice(qual: str, value: Any, choices: tuple) -> None:
    """The one check of a Literal field's value, for values being set and configs being validated alike."""
    if value not in choices:
        allowed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
        raise CairnError(f"{qual} must be {allowed}, got {value!r}: set {option(qual)} to one of them")


def check_choices(obj: Any, section: Optional[str]) -> None:
    """Every Literal-typed field of a section holds one of its values."""
    cls: type = type(obj)
    for name, tp in _field_types(cls).items():
        choices = _choices(tp)
        if choices is not None:
            check_choice(_qual(section, name), getattr(obj, name), choices)


def positive(obj: Any, section: Optional[str], names: str, zero_ok: bool = False) -> None:
    """Each of the space-separated fields is > 0 (>= 0 with zero_ok)."""
    for name in names.split():
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not zero_ok):
            need, hint = ("zero or more", "0 or more") if zero_ok else ("positive", "a positive value")
            qual = _qual(section, name)
            raise CairnError(f"{qual} must be {need}, got {value}: set {option(qual)} to {hint}")


def below_one(obj: Any, section: str, names: str) -> None:
    """Each of the space-separated fields is in [0, 1)."""
    for name in names.split():
        if not 0 <= getattr(obj, name) < 1:
            qual = f"{section}.{name}"
            raise CairnError(f"{qual} must be in [0, 1), got {getattr(obj, name)}: change {option(qual)}")


OFF = ("", "0", "off", "none")  # what turns a time budget off


def parse_duration(text: str) -> float:
    """Seconds in "600", "600s", "10m", "1.5h" (CairnError otherwise)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise CairnError(f"budget.time_budget {text!r} is not a duration: give e.g. 600s, 10m or 1.5h, "
                         "or off (0) for no budget")
    return seconds


def budget_seconds(text: str) -> Optional[float]:
    """A time budget in seconds, or None when it is off ("", "0", "off" or "none")."""
    if text.strip().lower() in OFF:
        return None
    try:
        return parse_duration(text)
    except CairnError:
        if _zero(text):
            return None  # "0s", "0m": no budget, as "0" is
        raise


def _zero(text: str) -> bool:
    try:
        return float(text.strip().lower().rstrip("smh")) == 0
    except ValueError:
        return False
