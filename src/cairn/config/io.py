"""Setting a config's values by name, and config files: `--key value` overrides, TOML in and out.

Every field has a short name unique across sections (`lr`) and a qualified one (`schedule.lr`).
A config file holds a table per section; the sections of older files (`[train]` holding every
optimizer, schedule, evaluation, checkpoint, budget, LoRA and system setting, `[data]` holding the
chat template) still load: their keys are found by short name in the section that holds them now.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Optional

import tomli_w
from dataclasses import fields

from cairn.config.rules import _choices, _field_types, _flag, _qual, check_choice
from cairn.config.sections import SECTIONS, RunConfig
from cairn.util.errors import CairnError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# sections of config files written before the config was split by concern: their keys are looked
# up by short name (a `[train]` table held what is now in train, optim, schedule, eval, checkpoint,
# budget, lora, system and report; `[data]` held the chat template)
LEGACY_SECTIONS = ("train", "data")

Index = dict[str, tuple[Optional[str], str, Any]]

@functools.cache
def field_index() -> Index:
    """Every settable key -> (section or None, field name, type). Short names are unique by design."""
    index: Index = {}
    top = _field_types(RunConfig)
    for name, tp in top.items():
        if name not in SECTIONS:
            index[name] = (None, name, tp)
    for section in SECTIONS:
        for name, tp in _field_types(top[section]).items():
            assert name not in index, f"field name {name} is not unique"
            index[name] = index[f"{section}.{name}"] = (section, name, tp)
    return index


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    if isinstance(value, str):
        value = value.replace("_", "")
        if "e" in value.lower() and float(value).is_integer():  # 1e3, as people write step counts
            return int(float(value))
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    out = float(value)
    if not math.isfinite(out):
        raise ValueError
    return out


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _to_names(value: Any) -> tuple[str, ...]:
    """A list of names: a TOML list of strings, or "a,b" as the command line gives it."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValueError
    return tuple(dict.fromkeys(v.strip() for v in items if v.strip()))


_PARSERS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
                            tuple[str, ...]: _to_names}
_EXAMPLES: dict[Any, str] = {int: "a whole number, e.g. 32", float: "a finite number, e.g. 0.001",
                             bool: "true or false", str: "text",
                             tuple[str, ...]: 'names, comma-separated ("a,b") or a list (["a", "b"])'}


def _coerce(key: str, value: Any, tp: Any, qual: str) -> Any:
    """`value` (CLI text or a TOML value) as the field's type; `key` is the name as the user gave it."""
    choices = _choices(tp)
    if choices is not None:
        check_choice(qual, value, choices)
        return value
    try:
        return _PARSERS[tp](value)
    except (ValueError, TypeError, OverflowError):
        pass
    article = "an" if tp is int else "a"
    kind = "list of names" if tp == tuple[str, ...] else tp.__name__
    raise CairnError(f"{key} must be {article} {kind}, got {value!r}: give {_EXAMPLES[tp]}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    index = field_index()
    norm = key.replace("-", "_")
    if norm not in index:
        raise CairnError(f"unknown option {key!r}: run `cairn train --help` to see every option")
    section, name, tp = index[norm]
    target = cfg if section is None else getattr(cfg, section)
    setattr(target, name, _coerce(key, value, tp, _qual(section, name)))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return cfg


def from_dict(d: dict) -> RunConfig:
    """A config from its dict (`to_dict`'s shape, or a checkpoint's config of an older layout)."""
    return apply_overrides(RunConfig(), _flatten(d))


# ---------------------------------------------------------------- TOML files

def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(cfg.to_dict())


def _read_toml(path: Path) -> dict:
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise CairnError(f"{where} is a directory: pass the path of a .toml file")
    if not path.is_file():
        raise CairnError(f"{where} does not exist: check the path")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CairnError(f"{where} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise CairnError(f"{where} is not valid TOML ({_one_line(e)}): fix the file") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables by recursion
        raise CairnError(f"{where} nests arrays or tables too deeply to read: fix the file") from None
    except OSError as e:
        raise CairnError(f"cannot read {where} ({e.strerror or e}): check its permissions") from None


def _flatten(raw: dict) -> dict[str, Any]:
    """A config table's settings as `key` / `section.key` overrides, every key checked to exist."""
    index = field_index()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CairnError(f"[{key}] must be a table: put its settings under a [{key}] header")
            for sub, v in value.items():
                flat[_section_key(index, key, sub)] = v
        elif isinstance(value, dict):
            raise CairnError(f"unknown section [{key}]: use one of {', '.join(f'[{s}]' for s in SECTIONS)}")
        elif key not in index or index[key][0] is not None:
            raise CairnError(f"unknown top-level key {key!r}: see `cairn train --help`")
        else:
            flat[key] = value
    return flat


def _section_key(index: Index, section: str, key: str) -> str:
    """`section.key`, or where an older file's `[train]` / `[data]` key lives now."""
    if not isinstance(key, str):
        raise CairnError(f"[{section}] holds a key that is not text ({key!r}): fix the file")
    if f"{section}.{key}" in index:
        return f"{section}.{key}"
    if section in LEGACY_SECTIONS and key in index and index[key][0] is not None:
        return f"{index[key][0]}.{key}"
    raise CairnError(f"unknown key {section}.{key}: see `cairn train --help`")


def read_toml(path: str | Path) -> dict:
    """A TOML config file's raw table (one-line errors for a missing, unreadable or invalid file)."""
    return _read_toml(Path(path))


def load_toml(path: str | Path, cfg: Optional[RunConfig] = None) -> RunConfig:
    """Apply a TOML file (a table per section; top-level name/seed/tokenizer/init_from) over
    `cfg` (default: the defaults). A `preset = "..."` line is read by `presets.config_file`."""
    path = Path(path)
    raw = _read_toml(path)
    raw.pop("preset", None)
    try:
        return apply_overrides(cfg if cfg is not None else RunConfig(), _flatten(raw))
    except CairnError as e:
        raise CairnError(f"config file {str(path)!r}: {e.raw()}") from None


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (the CLI prints every error as one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def describe_options() -> str:
    """Every option with its help text and default, for --help."""
    out = []
    top = _field_types(RunConfig)
    groups: list[tuple[Optional[str], Any]] = [(None, RunConfig), *((s, top[s]) for s in SECTIONS)]
    for section, cls in groups:
        if section:
            out.append(f"\n  [{section}]")
        out += [f"  {_flag(f.name):<20} {f.metadata['help']} (default {f.default!r})"
                for f in fields(cls) if "help" in f.metadata]
    return "\n".join(out)
