"""The interface every data format implements (`DataFormat`), and what a format gives a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol, TypeVar, runtime_checkable

from cairn.config.sections import RunConfig
from cairn.tokenizer.base import Tokenizer

if TYPE_CHECKING:  # the data worker processes that import this package need no torch
    import torch

T = TypeVar("T")


@runtime_checkable
class Rows(Protocol):
    """Training or held-out rows: each a dict of `input_ids` and `labels` (IGNORE_INDEX where no target)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, "torch.Tensor"]: ...


@dataclass
class RunDatasets:
    """What a format gives a run: its rows (an empty held-out split is None: nothing to score), what
    run.json records of them, and the held-out conversations a tuned run answers at its end."""
    train: Rows
    val: Optional[Rows]
    test: Optional[Rows]
    cache_dir: str
    meta: dict = field(default_factory=dict)
    unit: str = "windows"  # what a training row is, in the logs
    conversations: list[list[dict]] = field(default_factory=list)


class MainFirst(Protocol):
    """Runs `fn` on the main process first (it may write shared files), then on the others."""

    def __call__(self, fn: Callable[[], T]) -> T: ...


class DataFormat(Protocol):
    name: str
    learns_tokenizer: bool  # a `bpe:N` tokenizer can be learned from its records
    chat: bool  # its runs are talked to through their chat template (generate, chat, serve)

    def prepare(self, cfg: RunConfig, tokenizer: Tokenizer, main_first: MainFirst) -> RunDatasets:
        """The run's rows. `main_first` runs work that writes shared files on one process first."""
        ...

    def held_out(self, cfg: RunConfig, tokenizer: Tokenizer, data: Optional[str], split: str) -> tuple[Rows, str]:
        """Rows to score a trained run on (every record of `data`, or the run's `split`), and what they are."""
        ...
