"""Train an own byte-level BPE tokenizer (`cairn tokenizer train`) with Hugging Face `tokenizers`.

The tokenizer is GPT-2's kind: text is cut with GPT-2's pre-tokenization regex, each piece is
turned into bytes (shown as GPT-2's printable byte characters), and merges are learned on the
stories. Every one of the 256 bytes is in the vocabulary, so any text encodes and decodes back
exactly. `<|endoftext|>` is a special token: cairn puts it after every story.

The directory it writes holds
  tokenizer.json        the tokenizer (loadable by `tokenizers` and `transformers`)
  cairn-tokenizer.json  name ("bpe-" + sha256 prefix of tokenizer.json), vocab size, <|endoftext|> id

By default it learns from the training split only (the same seeded shuffle and cut as
`cairn train`, with --seed and --train-frac), so the held-out stories a model is scored on never
shaped its tokenizer; a model run with the same seed and a train_frac at least as large trains on
a superset of these stories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import (EOT, INFO_FILE, MAX_VOCAB, MIN_VOCAB, TOKENIZER_FILE, BPETokenizer, Tokenizer,
                                  content_name)

# a pair seen more often than this in any corpus cairn could read does not exist; the trainer takes a
# 64-bit count, and a larger number raised OverflowError from inside it
MAX_MIN_FREQUENCY = 2**32


def train_bpe(texts: Sequence[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> BPETokenizer:
    """Learn a byte-level BPE of at most `vocab_size` tokens (fewer if the text runs out of pairs
    seen `min_frequency` times) and write it to `out_dir`; return it loaded."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise CairnError("training a tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    if vocab_size < MIN_VOCAB:
        raise CairnError(f"{option('model.vocab_size')} must be at least {MIN_VOCAB} (256 bytes + {EOT}), got "
                         f"{vocab_size}")
    if vocab_size > MAX_VOCAB:  # the trainer reserves memory for the vocabulary asked: 10^8 took over 20 GB
        raise CairnError(f"{option('model.vocab_size')} must be at most {MAX_VOCAB}, got {vocab_size}: "
                         f"set {option('model.vocab_size')} lower")
    if not 1 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise CairnError(f"{option('min_frequency')} must be from 1 to {MAX_MIN_FREQUENCY}, got {min_frequency}")
    if not texts:
        raise CairnError(f"no stories to train the tokenizer on: check {option('data.source')}")
    out = Path(out_dir)
    _check_out(out)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    text = tok.to_str()

    with files.atomic_dir(out) as tmp:
        (tmp / TOKENIZER_FILE).write_text(text, encoding="utf-8")
        loaded = BPETokenizer(tmp)  # checks the file and computes the name from its bytes
        info = {**loaded.info(), "trained_on": {"stories": len(texts),
                                                "bytes": sum(len(t.encode("utf-8")) for t in texts)},
                "requested_vocab_size": vocab_size, "min_frequency": min_frequency}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    result = BPETokenizer(out)
    assert result.name == content_name((out / TOKENIZER_FILE).read_bytes())
    return result


def _check_out(out: Path) -> None:
    """--out must be a new or empty directory, or one holding only an earlier tokenizer."""
    if out.exists() and not out.is_dir():
        raise CairnError(f"{option('out')} {str(out)!r} is a file, not a directory: choose another {option('out')}")
    if out.is_dir():
        other = [p.name for p in out.iterdir() if p.name not in (TOKENIZER_FILE, INFO_FILE)]
        if other:
            raise CairnError(f"{option('out')} {str(out)!r} already holds other files "
                             f"({', '.join(sorted(other)[:3])}): "
                             "choose a new directory")


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Compression: UTF-8 bytes of `texts` per token (higher = fewer tokens for the same text)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(list(texts)))
    return n_bytes / max(n_tokens, 1)
