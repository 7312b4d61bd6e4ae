"""Where stories come from: local .txt/.jsonl/.parquet files, directories, globs, or a hub dataset.

Every loader returns one Python string per story, in file order (files sorted by path). Problems
with the user's data raise `CairnError` with a one-line message that names the file (and the line
where that is cheap to know) and says what to do.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

from ..errors import CairnError

EXTENSIONS = (".txt", ".jsonl", ".parquet")
_EXT_LIST = ".txt, .jsonl, .parquet or a directory"
_GLOB_CHARS = re.compile(r"[*?\[]")
# A hub id is "name" or "owner/name". Anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
_HUB_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------- resolving the source

def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(EXTENSIONS)


def _looks_like_path(source: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        source.startswith((".", "~"))
        or os.path.isabs(source)
        or source.lower().endswith(EXTENSIONS)
        or (any(s in source for s in seps) and not _is_hub_id(source))
    )


def _scan_dir(root: Path) -> list[Path]:
    # Hidden files and folders (.git, .ipynb_checkpoints, editor backups) are never data.
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _check_ext(path: Path) -> Path:
    if not path.name.lower().endswith(EXTENSIONS):
        raise CairnError(f"data file {str(path)!r} has an unknown type: use {_EXT_LIST}")
    return path


def resolve_files(source: str) -> Optional[tuple[Path, list[Path]]]:
    """The local files `source` names, sorted, with the folder their names are relative to.

    Returns None when `source` is a hub dataset id. Raises CairnError for a path that does not
    exist, a directory or glob with no data files, or a file of an unknown type.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        files = _scan_dir(path)
        if not files:
            raise CairnError(f"directory {source!r} holds no data files: put {', '.join(EXTENSIONS)} files in it")
        return path, files
    if path.is_file():
        return path.parent, [_check_ext(path)]
    if _GLOB_CHARS.search(source):
        files: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            p = Path(match)
            if p.is_dir():
                files += _scan_dir(p)
            elif p.is_file():
                files.append(_check_ext(p))
        files = sorted(set(files))
        if not files:
            raise CairnError(f"no data files match {source!r}: check the pattern (files must be {', '.join(EXTENSIONS)})")
        base = Path(os.path.commonpath([str(p.parent) for p in files]))
        return base, files
    if _looks_like_path(source):
        raise CairnError(f"data path {source!r} does not exist: check the path, or pass a hub dataset id")
    return None


# ---------------------------------------------------------------- readers

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CairnError(f"cannot read data file {str(path)!r} ({e.strerror or e}): "
                         "check that it exists and that you may read it") from None


def _decode(raw: bytes, path: Path) -> str:
    try:
        # utf-8-sig: a byte-order mark from a Windows editor is not part of the first story.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CairnError(f"{path}:{line}: not valid UTF-8 (byte {e.start}): convert the file to UTF-8") from None


def _read_txt(path: Path, separator: str) -> list[str]:
    # Windows line ends are normalised so a file tokenizes the same whichever OS wrote it.
    text = _decode(_read_bytes(path), path).replace("\r\n", "\n")
    stories, current = [], []
    blank_mode = separator == "blank"
    sep = separator.strip()

    def flush():
        # Whitespace around a story is part of the file layout, not the story.
        story = "\n".join(current).strip()
        if story:
            stories.append(story)
        current.clear()

    for line in text.split("\n"):
        if (blank_mode and not line.strip()) or (not blank_mode and line.strip() == sep):
            flush()
        else:
            current.append(line)
    flush()
    return stories


def _read_jsonl(path: Path, field: str) -> list[str]:
    text = _decode(_read_bytes(path), path)
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # a trailing newline or blank line separates nothing
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CairnError(f"{path}:{lineno}: not valid JSON ({e.msg}): each line must be one JSON object") from None
        except RecursionError:
            raise CairnError(f"{path}:{lineno}: JSON nested too deeply to read: "
                             "each line must be one JSON object holding the text") from None
        if not isinstance(record, dict) or field not in record:
            have = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
            raise CairnError(f"{path}:{lineno}: no field {field!r} (found {have or 'nothing'}): "
                             "set --text-field to the field that holds the text")
        value = record[field]
        if value is None:
            value = ""  # a null story is an empty one; cleaning drops it
        if not isinstance(value, str):
            raise CairnError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not text: "
                             "set --text-field to the field that holds the text")
        out.append(value)
    return out


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise CairnError(f"{path}: not a readable parquet file ({e}): check the file") from None
    if field not in schema.names:
        raise CairnError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}): "
                         "set --text-field to the column that holds the text")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise CairnError(f"{path}: column {field!r} holds {kind}, not text: "
                         "set --text-field to the column that holds the text")
    try:
        column = pq.read_table(path, columns=[field]).column(field)
        values = column.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, OSError) as e:
        raise CairnError(f"{path}: cannot read column {field!r} ({e}): check that it is UTF-8 text") from None
    out = []
    for row, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise CairnError(f"{path}: row {row} of column {field!r} is not valid UTF-8: "
                                 "convert the text to UTF-8") from None
        out.append(value if value is not None else "")
    return out


def _read_file(path: Path, text_field: str, txt_separator: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path, txt_separator)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


# ---------------------------------------------------------------- the hub

def _offline_requested() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection reach the hub (or the proxy in front of it) within `timeout` seconds?

    `datasets` retries for tens of seconds when there is no network; this probe lets us say so at
    once. Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    target = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
              or os.environ.get("ALL_PROXY") or os.environ.get("all_proxy")
              or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    url = urlparse(target if "://" in target else f"http://{target}")
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result["ok"]


def _no_network_error(source: str) -> CairnError:
    # Also what a mistyped relative path like "data/stories" ends in: it has a hub id's shape.
    return CairnError(f"cannot load hub dataset {source!r} (no network?): "
                      f"pass local files with --data PATH ({_EXT_LIST})")


def _load_hub(source: str, text_field: str, hub_split: str) -> list[str]:
    # With HF_HUB_OFFLINE set, `datasets` reads its own cache and fails fast on a miss.
    if not _offline_requested() and not _hub_reachable():
        raise _no_network_error(source)
    import datasets

    try:
        ds = datasets.load_dataset(source, split=hub_split)
    except ConnectionError:
        raise _no_network_error(source) from None
    except Exception as e:  # datasets raises many types; all mean "this id/split cannot be loaded"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CairnError(f"cannot load hub dataset {source!r} split {hub_split!r} ({first}): "
                         f"check the id and --hub-split, or pass local files with --data PATH ({_EXT_LIST})") from None
    if text_field not in ds.column_names:
        raise CairnError(f"hub dataset {source!r} has no column {text_field!r} "
                         f"(columns: {', '.join(ds.column_names)}): set --text-field")
    return [t if t is not None else "" for t in ds[text_field]]


# ---------------------------------------------------------------- public API

def load_texts(source: str, text_field: str = "text", txt_separator: str = "<|endoftext|>",
               hub_split: str = "train") -> list[str]:
    """Every story `source` holds, in file order.

    `source` is a .txt/.jsonl/.parquet file, a directory (its data files, recursively, sorted), a
    glob, or else a Hugging Face hub dataset id. In .txt files stories are separated by a line that
    is exactly `txt_separator` (surrounding spaces ignored), or by blank lines when it is "blank";
    each story's surrounding whitespace is stripped. In .jsonl/.parquet/hub data, `text_field`
    holds the text, kept exactly as stored (a null counts as an empty story).
    """
    if not source:
        raise CairnError("data source is empty: pass --data PATH_OR_HUB_ID")
    resolved = resolve_files(source)
    if resolved is None:
        return _load_hub(source, text_field, hub_split)
    texts: list[str] = []
    for path in resolved[1]:
        texts += _read_file(path, text_field, txt_separator)
    return texts


def clean_texts(texts: Iterable[Optional[str]]) -> list[str]:
    """Drop empty and whitespace-only stories (the tutorial's cleaning); keep the rest unchanged."""
    return [t for t in texts if t and not t.isspace()]


def source_fingerprint(source: str, text_field: str = "text", txt_separator: str = "<|endoftext|>",
                       hub_split: str = "train") -> str:
    """A hash that changes when what `load_texts` would return with these arguments can change.

    Local files: sha256 over each file's name (relative to the source folder, so moving the data
    keeps the hash), size and content. Hub ids: the id and split only, which needs no network, so a
    cache made online is found offline; delete the cache to pick up a new hub revision.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"text_field": text_field, "txt_separator": txt_separator}).encode())
    resolved = resolve_files(source)
    if resolved is None:
        h.update(json.dumps({"hub": source, "split": hub_split}).encode())
        return "hub-" + h.hexdigest()
    base, files = resolved
    for path in files:
        name = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
        try:
            h.update(f"\0{name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise CairnError(f"cannot read data file {str(path)!r} ({e.strerror or e}): "
                             "check that it exists and that you may read it") from None
    return "files-" + h.hexdigest()
