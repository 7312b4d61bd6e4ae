"""Where stories come from: local .txt/.jsonl/.parquet files, directories, globs, or a hub dataset.

A source is read in chunks of about a megabyte (`source_chunks`, `read_chunk`), so it is never
held in memory whole and chunks can be parsed in other processes; `iter_texts` and `load_texts`
give one Python string per story, in file order (files sorted by path). Problems with the user's
data raise `CairnError` with a one-line message that names the file (and the line where that is
cheap to know) and says what to do.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Optional, Sequence, Union
from urllib.parse import urlparse

from cairn.util.errors import CairnError, option

if TYPE_CHECKING:
    import datasets

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
            full = Path(dirpath) / name
            # a pipe or device named like data would block the reader forever: only regular files are data
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS) and full.is_file():
                found.append(full)
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
    if path.exists():
        raise CairnError(f"data path {source!r} is not a regular file (a pipe or a device?): pass a data file or "
                         "a directory of them")
    if _GLOB_CHARS.search(source):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            p = Path(match)
            if p.is_dir():
                files += _scan_dir(p)
            elif p.is_file():
                files.append(_check_ext(p))
        files = sorted(set(files))
        if not files:
            raise CairnError(f"no data files match {source!r}: check the pattern "
                             f"(files must be {', '.join(EXTENSIONS)})")
        base = Path(os.path.commonpath([str(p.parent) for p in files]))
        return base, files
    if _looks_like_path(source):
        raise CairnError(f"data path {source!r} does not exist: check the path, or pass a hub dataset id")
    return None


# ---------------------------------------------------------------- chunks: a source read piece by piece
#
# A source is read as a sequence of chunks, each a few MB, so no step ever holds the whole source:
# a byte range of a .jsonl/.txt file cut where a story ends (parsed by whoever gets it, e.g. a
# worker process), or a list of texts already read (parquet row batches, hub datasets).

CHUNK_BYTES = 1 << 20  # about 1,000 TinyStories stories: small in memory, large enough to amortise a task
_ARROW_BATCH_ROWS = 1024  # rows per Arrow read; several batches fill one chunk


@dataclass(frozen=True)
class FileChunk:
    """Bytes [start, end) of a .jsonl or .txt file, cut right after a story ends, so that parsed on
    its own it gives exactly the stories the whole file gives there."""

    path: str
    kind: str  # "jsonl" or "txt"
    start: int
    end: int
    option: str  # the text field (jsonl) or the story separator (txt)

    @property
    def n_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TextsChunk:
    """Stories already read (from parquet or a hub dataset), None meaning an empty story."""

    texts: list[Optional[str]]
    n_bytes: int  # their size as stored (Arrow buffers), for throughput figures


Chunk = Union[FileChunk, TextsChunk]


class ChunkProblem(Exception):
    """Bad data found in a chunk, located within the chunk; `locate` turns it into the file's line.

    A worker parsing one chunk does not know how many lines came before it; whoever reads the
    chunks in order does."""

    def __init__(self, path: str, chunk_start: int, line: int, what: str, byte: int = -1):
        super().__init__(path, chunk_start, line, what, byte)
        self.path, self.chunk_start, self.line, self.what, self.byte = path, chunk_start, line, what, byte

    def locate(self, lines_before: int) -> CairnError:
        what = self.what
        if self.byte >= 0:
            what = f"not valid UTF-8 (byte {self.chunk_start + self.byte}): convert the file to UTF-8"
        return CairnError(f"{self.path}:{lines_before + self.line}: {what}")


class LineCounter:
    """Lines of each file read so far, in chunk order: makes a chunk's problems name the file's line."""

    def __init__(self) -> None:
        self.path, self.lines = "", 0

    def advance(self, chunk: Chunk, n_lines: int) -> None:
        if isinstance(chunk, FileChunk):
            if chunk.start == 0 or chunk.path != self.path:
                self.path, self.lines = chunk.path, 0
            self.lines += n_lines

    def locate(self, problem: ChunkProblem) -> CairnError:
        # The problem is in the chunk after the last one counted: same file unless that chunk starts one.
        same_file = problem.path == self.path and problem.chunk_start != 0
        return problem.locate(self.lines if same_file else 0)


def _cannot_read(path: Path | str, e: OSError) -> CairnError:
    return CairnError(f"cannot read data file {str(path)!r} ({e.strerror or e}): "
                      "check that it exists and that you may read it")


def _is_separator(line: bytes, separator: str) -> bool:
    # The same test as _parse_txt's, on one raw line; bad UTF-8 is reported when the chunk is parsed.
    text = line.decode("utf-8", errors="replace")
    return not text.strip() if separator == "blank" else text.strip() == separator.strip()


def _story_end(f: BinaryIO, pos: int, size: int, kind: str, option: str) -> int:
    """The first place at or after `pos` where a chunk may end: after a line (jsonl), or after a
    separator line (txt, where a story spans lines)."""
    if pos >= size:
        return size
    f.seek(pos)
    f.readline()  # the rest of the line `pos` falls in
    if kind == "jsonl":
        return min(f.tell(), size)
    while True:
        line = f.readline()
        if not line:
            return size
        if _is_separator(line, option):
            return f.tell()


def _file_chunks(path: Path, kind: str, option: str, chunk_bytes: int) -> Iterator[FileChunk]:
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with f:
        start = 0
        while start < size:
            try:
                end = _story_end(f, start + max(chunk_bytes, 1), size, kind, option)
            except OSError as e:
                raise _cannot_read(path, e) from None
            yield FileChunk(str(path), kind, start, end, option)
            start = end


def _arrow_chunks(columns: Iterable[Any], where: str, field: str, chunk_bytes: int) -> Iterator[TextsChunk]:
    """Group Arrow string/binary arrays (pyarrow has no types) into chunks of about `chunk_bytes`;
    binary must be UTF-8."""
    texts: list[Optional[str]] = []
    n_bytes = row = 0
    for column in columns:
        values = column.to_pylist()
        for i, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    values[i] = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise CairnError(f"{where}: row {row + i} of column {field!r} is not valid UTF-8: "
                                     "convert the text to UTF-8") from None
        texts += values
        row += len(values)
        n_bytes += column.nbytes
        if n_bytes >= chunk_bytes:
            yield TextsChunk(texts, n_bytes)
            texts, n_bytes = [], 0
    if texts:
        yield TextsChunk(texts, n_bytes)


def _parquet_chunks(path: Path, field: str, chunk_bytes: int) -> Iterator[TextsChunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise CairnError(f"{path}: not a readable parquet file ({e}): check the file") from None
    if field not in schema.names:
        raise CairnError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}): "
                         f"set {option('data.text_field')} to the column that holds the text")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise CairnError(f"{path}: column {field!r} holds {kind}, not text: "
                         f"set {option('data.text_field')} to the column that holds the text")

    def columns() -> Iterator[Any]:
        # Record batches, so memory holds one batch (and Arrow's read buffers), never the file.
        try:
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=_ARROW_BATCH_ROWS, columns=[field]):
                    yield batch.column(0)
        except (pa.ArrowException, UnicodeDecodeError, OSError) as e:
            raise CairnError(f"{path}: cannot read column {field!r} ({e}): check that it is UTF-8 text") from None

    yield from _arrow_chunks(columns(), str(path), field, chunk_bytes)


def _decode_chunk(raw: bytes, chunk: FileChunk) -> str:
    # utf-8-sig at the file's start: a byte-order mark from a Windows editor is not part of the first story.
    skip = 3 if chunk.start == 0 and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise ChunkProblem(chunk.path, chunk.start, raw[:at].count(b"\n") + 1, "", byte=at) from None


def _parse_txt(text: str, separator: str) -> list[str]:
    # Windows line ends are normalised so a file tokenizes the same whichever OS wrote it.
    text = text.replace("\r\n", "\n")
    stories: list[str] = []
    current: list[str] = []
    blank_mode = separator == "blank"
    sep = separator.strip()

    def flush() -> None:
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


_JSON = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SPACE = " \t\r\n"


def _json_line(line: str) -> Any:
    """json.loads(line), about twice as fast on good lines: raw_decode skips loads' wrapper."""
    try:
        record, end = _JSON.raw_decode(line)
        if end == len(line) or not line[end:].strip(_JSON_SPACE):
            return record
    except json.JSONDecodeError:
        pass
    return json.loads(line)  # leading whitespace, or the exact error for a bad line


def _parse_jsonl(text: str, chunk: FileChunk) -> list[Optional[str]]:
    field = chunk.option
    out: list[Optional[str]] = []

    def problem(lineno: int, what: str) -> ChunkProblem:
        return ChunkProblem(chunk.path, chunk.start, lineno, what)

    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # a trailing newline or blank line separates nothing
        try:
            record = _json_line(line)
        except json.JSONDecodeError as e:
            raise problem(lineno, f"not valid JSON ({e.msg}): each line must be one JSON object") from None
        except RecursionError:
            raise problem(lineno, "JSON nested too deeply to read: "
                                  "each line must be one JSON object holding the text") from None
        if not isinstance(record, dict) or field not in record:
            have = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
            raise problem(lineno, f"no field {field!r} (found {have or 'nothing'}): "
                                  "set --text-field to the field that holds the text")
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise problem(lineno, f"field {field!r} is a {type(value).__name__}, not text: "
                                  "set --text-field to the field that holds the text")
        lone = _SURROGATE.search(value) if value and not value.isascii() else None
        if lone:  # JSON may escape half of a UTF-16 pair on its own ("\ud800"); no UTF-8 text holds one
            raise problem(lineno, f"field {field!r} holds an unpaired surrogate escape ({lone.group()!a}), "
                                  "which is not text: "
                                  "fix the file's writer (pair it or drop it)")
        out.append(value)  # a null story is an empty one; cleaning drops it
    return out


def read_chunk(chunk: Chunk) -> tuple[Sequence[Optional[str]], int]:
    """(the chunk's stories in order, None for a null one; its newline count). Raises ChunkProblem
    for bad data (to be located with a LineCounter) and CairnError when the file cannot be read."""
    if isinstance(chunk, TextsChunk):
        return chunk.texts, 0
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            raw = f.read(chunk.n_bytes)
    except OSError as e:
        raise _cannot_read(chunk.path, e) from None
    text = _decode_chunk(raw, chunk)
    stories: Sequence[Optional[str]] = _parse_jsonl(text, chunk) if chunk.kind == "jsonl" \
        else _parse_txt(text, chunk.option)
    return stories, raw.count(b"\n")


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

    def probe() -> None:
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
                      f"pass local files with {option('data.source')} PATH ({_EXT_LIST})")


def _cached_snapshot(source: str) -> Optional[str]:
    """The folder of `source`'s snapshot in the Hugging Face hub cache (the revision `refs/main`
    names), as an online `load_dataset` or `hf download` left it; None when it is not cached.

    `datasets` does not look there: offline, `load_dataset("owner/name")` only finds its own
    Arrow cache (HF_DATASETS_CACHE) and otherwise fails with "Couldn't reach ... on the Hub",
    even with every file of the repository on disk in the hub cache (HF_HUB_CACHE)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a name the hub would refuse
        return None


def _load_hub_dataset(source: str, path: str, hub_split: str) -> datasets.Dataset:
    """`datasets.load_dataset` on a hub id or on its cached snapshot's folder: the same files give
    the same splits and columns; every failure becomes one line naming the id and the split."""
    import datasets

    try:
        return datasets.load_dataset(path, split=hub_split)
    except ConnectionError:
        raise _no_network_error(source) from None
    except Exception as e:  # datasets raises many types; all mean "this id/split cannot be loaded"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CairnError(f"cannot load hub dataset {source!r} split {hub_split!r} ({first}): "
                         f"check the id and {option('data.hub_split')}, or pass local files with "
                         f"{option('data.source')} PATH ({_EXT_LIST})") from None


def _hub_dataset(source: str, text_field: str, hub_split: str) -> datasets.Dataset:
    """The hub dataset, as `datasets` keeps it: Arrow files on disk, memory-mapped, not in RAM.

    Online, `datasets.load_dataset(source)` downloads it (into the hub cache) as the tutorial does.
    Offline (HF_HUB_OFFLINE, or the hub out of reach), the snapshot in the hub cache is loaded
    from its folder; without one, HF_HUB_OFFLINE still lets `datasets` try its own cache."""
    offline = _offline_requested()
    if offline or not _hub_reachable():
        snapshot = _cached_snapshot(source)
        if snapshot is not None:
            ds = _load_hub_dataset(source, snapshot, hub_split)
        elif offline:
            ds = _load_hub_dataset(source, source, hub_split)
        else:
            raise _no_network_error(source)
    else:
        ds = _load_hub_dataset(source, source, hub_split)
    if text_field not in ds.column_names:
        raise CairnError(f"hub dataset {source!r} has no column {text_field!r} "
                         f"(columns: {', '.join(ds.column_names)}): set {option('data.text_field')}")
    return ds


def _dataset_chunks(ds: datasets.Dataset, where: str, text_field: str, chunk_bytes: int) -> Iterator[TextsChunk]:
    """A `datasets.Dataset`'s text column in chunks, read batch by batch from its Arrow files."""
    table = ds.select_columns([text_field]).with_format("arrow")
    columns = (batch.column(0) for batch in table.iter(batch_size=_ARROW_BATCH_ROWS))
    return _arrow_chunks(columns, where, text_field, chunk_bytes)


# ---------------------------------------------------------------- public API

def source_chunks(source: str, text_field: str = "text", txt_separator: str = "<|endoftext|>",
                  hub_split: str = "train", chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """`source` as chunks of about `chunk_bytes`, in file order; `read_chunk` gives their stories.

    The same arguments always give the same chunks. Problems found before any story is parsed (a
    missing path, an unreadable parquet schema, no network) raise CairnError here.
    """
    if not source:
        raise CairnError(f"data source is empty: pass {option('data.source')} PATH_OR_HUB_ID")
    resolved = resolve_files(source)
    if resolved is None:
        ds = _hub_dataset(source, text_field, hub_split)
        yield from _dataset_chunks(ds, f"hub dataset {source!r}", text_field, chunk_bytes)
        return
    for path in resolved[1]:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _parquet_chunks(path, text_field, chunk_bytes)
        else:
            kind = suffix[1:]
            yield from _file_chunks(path, kind, text_field if kind == "jsonl" else txt_separator, chunk_bytes)


def source_bytes(source: str) -> Optional[int]:
    """Total size of the local files `source` names; None for a hub dataset."""
    resolved = resolve_files(source)
    if resolved is None:
        return None
    try:
        return sum(path.stat().st_size for path in resolved[1])
    except OSError as e:
        raise CairnError(f"cannot read data file ({e.strerror or e}): check that it exists and that you may "
                         "read it") from None


def iter_texts(source: str, text_field: str = "text", txt_separator: str = "<|endoftext|>",
               hub_split: str = "train", chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Every story `source` holds, in file order, one at a time (memory: one chunk); see `load_texts`."""
    lines = LineCounter()
    for chunk in source_chunks(source, text_field, txt_separator, hub_split, chunk_bytes):
        try:
            stories, n_lines = read_chunk(chunk)
        except ChunkProblem as p:
            raise lines.locate(p) from None
        lines.advance(chunk, n_lines)
        for story in stories:
            yield story if story is not None else ""


def load_texts(source: str, text_field: str = "text", txt_separator: str = "<|endoftext|>",
               hub_split: str = "train") -> list[str]:
    """Every story `source` holds, in file order.

    `source` is a .txt/.jsonl/.parquet file, a directory (its data files, recursively, sorted), a
    glob, or else a Hugging Face hub dataset id. In .txt files stories are separated by a line that
    is exactly `txt_separator` (surrounding spaces ignored), or by blank lines when it is "blank";
    each story's surrounding whitespace is stripped. In .jsonl/.parquet/hub data, `text_field`
    holds the text, kept exactly as stored (a null counts as an empty story).

    This holds every story in memory; `iter_texts` streams them, and `prepare_data` never loads a
    whole source.
    """
    return list(iter_texts(source, text_field, txt_separator, hub_split))


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
