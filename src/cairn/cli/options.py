"""What several commands share: the parser class (errors as one line), --device, the empty-value check
and the sampling options built from SamplingConfig's fields. Nothing heavy is imported here: building
the parser must stay fast for `cairn --help`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Callable, NoReturn, Sequence, TypeAlias

from cairn.inference.sampling import SamplingConfig, SamplingError, settings
from cairn.util.errors import CairnError

# what a command runs once its options are parsed: the exit code
Command = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --d-mod is not --d-model: options are spelled out
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit code 2, instead of usage + message
        raise CairnError(f"{message} (see `{self.prog} --help`)")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # argparse drops a `--` value as the end of options, so `--out=--` gave --out an empty list
        # (not text) that the command then failed on; it is an option without its value
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


# the list of subcommands that each command module adds its parser to
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def not_empty(args: argparse.Namespace, command: str, *flags: str) -> None:
    """An option given as blank text is refused by its flag, before any work (argparse takes '' as a value)."""
    for name in flags:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            raise CairnError(f"--{name.replace('_', '-')} is empty: give a value or leave the option out "
                             f"(see `cairn {command} --help`)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_sampling(p: argparse.ArgumentParser, defaults: SamplingConfig, names: Sequence[str]) -> None:
    """The sampling settings `names` as options (--top-k N ...): type and help from SamplingConfig's
    fields, defaults from `defaults` (the command's own)."""
    for setting in settings(names):
        if setting.repeatable:
            p.add_argument(flag(setting.name), action="append", type=setting.kind, default=[], metavar="STR",
                           help=setting.help)
        else:
            default = getattr(defaults, setting.name)
            shown = f"{default:g}" if isinstance(default, float) else default
            p.add_argument(flag(setting.name), type=setting.kind, default=default,
                           help=f"{setting.help} (default {shown})")


def sampling(args: argparse.Namespace, defaults: SamplingConfig, names: Sequence[str]) -> SamplingConfig:
    """`defaults` with the settings `names` as the options gave them, checked; a bad one is named by its flag."""
    given: dict[str, Any] = {name: getattr(args, name) for name in names}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return checked(replace(defaults, **given))


def checked(s: SamplingConfig) -> SamplingConfig:
    """`s` if it can sample, else the first bad setting named by its flag (--top-p, not top_p)."""
    try:
        return s.check()
    except SamplingError as e:
        raise CairnError(e.named(flag(e.field))) from None


def add_config_options(p: argparse.ArgumentParser, keys: Sequence[str], *, keep_config: bool) -> None:
    """`--key` options for config fields, declared from the fields themselves (config/sections.py):
    their type, help text and default in one place for train, prepare and `tokenizer train`.
    `keep_config`: an option left out is None, so the preset's or the config file's value stays."""
    from dataclasses import fields

    from cairn.config.io import field_index
    from cairn.config.sections import RunConfig

    index, defaults = field_index(), RunConfig()
    for key in keys:
        section, name, tp = index[key]
        owner = defaults if section is None else getattr(defaults, section)
        default = getattr(owner, name)
        text = next(f.metadata["help"] for f in fields(owner) if f.name == name)
        p.add_argument("--" + key.replace("_", "-"), type=tp, default=None if keep_config else default,
                       help=f"{text} (default {default!r})")
