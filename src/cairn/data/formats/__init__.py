"""Data formats: what a run's records are, and how each becomes training rows, loss targets and
held-out scores. One module per format (`text`, `sft`), one interface (`base.DataFormat`): a new
format is a new module here and a line in `FORMATS`; nothing outside this package asks which format
a run has."""

from __future__ import annotations

from cairn.data.formats.base import DataFormat, MainFirst, Rows, RunDatasets
from cairn.data.formats.sft import SFT_FORMAT
from cairn.data.formats.text import TEXT_FORMAT
from cairn.util.errors import CairnError

FORMATS: dict[str, DataFormat] = {TEXT_FORMAT.name: TEXT_FORMAT, SFT_FORMAT.name: SFT_FORMAT}


def get_format(name: str) -> DataFormat:
    if name not in FORMATS:
        raise CairnError(f"unknown data format {name!r}: choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


__all__ = ["DataFormat", "MainFirst", "Rows", "RunDatasets", "FORMATS", "get_format"]
