"""What every property test asserts about bad input, whatever generated it: the command ends with exit
code 0 (the input was usable) or 2 with exactly one line `error: ...` on stderr (after any progress
lines cairn logged before it met the problem), never a traceback, and a refused command leaves the
directory it was given byte-for-byte as it was.

Commands run in-process (`cairn.cli.main(argv)`), with stdout, stderr and stdin replaced; an exception
that escapes main is the traceback a user would see, so it fails the property with that traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cairn.cli import main

Tree = dict[str, str]


@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return (f"cairn {' '.join(map(repr, self.argv))} -> exit {self.code}\nstderr: {self.err!r}\n"
                f"stdout: {self.out[-400:]!r}")


class Reached(Exception):
    """Raised by a test's stand-in for a command's expensive work: the command got that far (exit 0)."""


def cli(argv: list[str], stdin: str = "") -> Outcome:
    """`cairn ARGV` in this process: its exit code and what it printed. argparse's --help and
    --version end in SystemExit(0), which is an exit code here too, and so does Reached."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _stdin(stdin):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Reached:
            code = 0
    return Outcome(tuple(argv), code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _stdin(text: str) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def snapshot(root: Path) -> Tree:
    """Every entry under `root` (not following links): its kind and, for a file, a hash of its bytes."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISREG(mode):
                tree[rel] = "file " + hashlib.sha256(full.read_bytes()).hexdigest()
            elif stat.S_ISLNK(mode):
                tree[rel] = "link " + os.readlink(full)
            elif stat.S_ISDIR(mode):
                tree[rel] = "dir"
            else:
                tree[rel] = f"special {stat.S_IFMT(mode):o}"
    return tree


def changes(before: Tree, after: Tree) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


def assert_clean(o: Outcome, before: Optional[Tree] = None, after: Optional[Tree] = None,
                 codes: tuple[int, ...] = (0, 2)) -> None:
    """The property: exit 0 (or another of `codes`), or exit 2 with one line saying what is wrong and
    nothing under the snapshotted folder written, removed or changed; never a traceback."""
    assert "Traceback (most recent call last)" not in o.err + o.out, str(o)
    assert o.code in codes, f"unexpected exit code\n{o}"
    if o.code != 2:
        return
    # lines cairn logged about the work it did before it met the problem (`reading X with 1 worker`)
    # may come first; the refusal is the last line, and the only one that says `error:`
    lines = o.err.strip("\n").split("\n")
    assert [line for line in lines if line.startswith("error")] == lines[-1:], f"a refusal must be one line\n{o}"
    assert len(lines[-1].strip()) > len("error: ") + 8, str(o)
    if before is not None and after is not None:
        assert not changes(before, after), f"a refused command changed {changes(before, after)}\n{o}"


# ---------------------------------------------------------------- counting cases for the long run

def count(boundary: str) -> None:
    """One generated case tried at `boundary`, added to the JSON file CAIRN_PROPERTY_COUNTS names
    (benchmarks/scripts/properties.py reads it); nothing when it is unset."""
    path = os.environ.get("CAIRN_PROPERTY_COUNTS")
    if not path:
        return
    p = Path(path)
    counts: dict[str, int] = json.loads(p.read_text()) if p.exists() else {}
    counts[boundary] = counts.get(boundary, 0) + 1
    p.write_text(json.dumps(counts, indent=1, sort_keys=True))
