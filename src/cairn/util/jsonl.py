"""Reading the JSON Lines files a user hands cairn (prompts, instruction records, word prompts),
with the same one-line errors everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from cairn.util.errors import CairnError


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; `what` names it in errors ("prompt file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CairnError(f"{what} {str(path)!r} does not exist: check the path") from None
    except UnicodeDecodeError:
        raise CairnError(f"{what} {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except OSError as e:
        raise CairnError(f"cannot read {what} {str(path)!r} ({e.strerror or e}): check the path") from None


def records(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line."""
    for n, line in enumerate(read_lines(path, what), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise CairnError(f"{path}:{n}: not valid JSON: give one JSON object per line") from None
