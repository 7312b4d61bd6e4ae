"""How text is sampled: `SamplingConfig`, each setting with its default, its help text and the values
it allows, and the defaults of each use (`STORY`, `WORDS`, `OPENAI`). The CLI's sampling options,
serve's request fields and the library all read them from here.

No torch here: the CLI builds its options from this module before it imports anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterator, NamedTuple, Optional, Sequence, get_args, get_origin, get_type_hints

from cairn.util.errors import CairnError

MAX_SEED = 2**64 - 1  # torch's generators take seeds up to this


class SamplingError(CairnError):
    """A sampling setting that cannot sample: `field` names it, `rule` says what is allowed and what
    to give ("must be in (0, 1], got 0: use e.g. 0.9, or 1 for off"). The message names the field as
    the library does; `named` names it as the caller's user knows it (a CLI flag, an API field)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field, self.rule = field, rule

    def named(self, name: str) -> str:
        return f"{name} {self.rule}"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one text. The defaults are `cairn generate`'s; `check()` says which values are allowed."""

    max_new_tokens: int = field(default=200, metadata=_help("most tokens to generate"))
    temperature: float = field(default=0.8, metadata=_help("sampling temperature; 0 = greedy (always the most "
                                                           "likely token)"))
    top_k: int = field(default=0, metadata=_help("sample among the k most likely tokens; 0 = all"))
    top_p: float = field(default=1.0, metadata=_help("sample within the smallest set of tokens whose probability "
                                                     "reaches p; 1 = all"))
    repetition_penalty: float = field(default=1.0, metadata=_help("make tokens already in the prompt or text less "
                                                                  "likely, e.g. 1.2; 1 = off"))
    stop: tuple[str, ...] = field(default=(), metadata=_help("end a sample where this text appears (not printed); "
                                                             "repeatable"))
    seed: int = field(default=1234, metadata=_help("random seed: the same seed and settings write the same text"))
    stop_at_eot: bool = field(default=True, metadata=_help("end the text where the model writes <|endoftext|>"))

    def check(self, max_new_tokens_limit: Optional[int] = None) -> SamplingConfig:
        """This config, or SamplingError for the first setting that cannot sample. A server caps
        max_new_tokens at `max_new_tokens_limit`."""
        for rule in self._rules(max_new_tokens_limit):
            if not rule.ok:
                raise SamplingError(rule.field, f"must be {rule.allowed}, got {_shown(getattr(self, rule.field))}: "
                                                f"{rule.advice}")
        return self

    def _rules(self, max_new_tokens_limit: Optional[int]) -> Iterator[_Rule]:
        limit = max_new_tokens_limit
        if limit is None:
            yield _Rule("max_new_tokens", self.max_new_tokens >= 1, "positive", "ask for at least 1 token")
        else:
            yield _Rule("max_new_tokens", 1 <= self.max_new_tokens <= limit, f"from 1 to {limit}",
                        f"ask for at least 1 token and at most {limit}, the server's --max-tokens")
        t = self.temperature
        yield _Rule("temperature", math.isfinite(t) and t >= 0, "0 (greedy) or more", "use e.g. 0.8")
        yield _Rule("top_k", self.top_k >= 0, "zero (off) or more", "give a whole number from 0 up, e.g. 50")
        yield _Rule("top_p", 0 < self.top_p <= 1, "in (0, 1]", "use e.g. 0.9, or 1 for off")  # also false for nan
        p = self.repetition_penalty
        yield _Rule("repetition_penalty", math.isfinite(p) and p > 0, "a positive number", "use e.g. 1.2, or 1 for off")
        yield _Rule("seed", 0 <= self.seed <= MAX_SEED, "an integer from 0 to 2**64 - 1", "use e.g. 1234")

    def seeds(self, n: int) -> list[SamplingConfig]:
        """`n` samples of this config, with seeds seed, seed + 1, ... (how several samples of one prompt differ)."""
        return [replace(self, seed=self.seed + i) for i in range(n)]


class _Rule(NamedTuple):
    """One setting's check: whether its value is allowed, which values are (in words), what to give instead."""
    field: str
    ok: bool
    allowed: str
    advice: str


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class Setting(NamedTuple):
    """A setting as a command offers it: its name, the type of one value (a repeatable setting, such
    as stop, takes several), its help text."""
    name: str
    kind: type
    repeatable: bool
    help: str


def settings(names: Sequence[str]) -> list[Setting]:
    """The settings `names`, in that order."""
    hints = get_type_hints(SamplingConfig)
    helps = {f.name: f.metadata["help"] for f in fields(SamplingConfig)}
    unknown = [n for n in names if n not in helps]
    if unknown:
        raise ValueError(f"not sampling settings: {unknown}")
    out = []
    for n in names:
        repeatable = get_origin(hints[n]) is tuple
        out.append(Setting(n, get_args(hints[n])[0] if repeatable else hints[n], repeatable, helps[n]))
    return out


# The defaults of each use, besides `cairn generate`'s (SamplingConfig()):
# a story or an answer meant to be read (`cairn chat`): longer, and only among the 50 likeliest tokens,
# which keeps a small model's text on its subject
STORY = SamplingConfig(max_new_tokens=300, top_k=50)
# the words task: prompt i is sampled with seed i
WORDS = replace(STORY, seed=0)
# OpenAI's defaults for a completion request (serve draws a random seed when none is given)
OPENAI = SamplingConfig(max_new_tokens=16, temperature=1.0)
