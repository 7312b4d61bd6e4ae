"""Supervised fine-tuning data (`--format sft`): instruction records, the loss on the answers only.

Each JSONL record is a `prompt` and a `response` (field names configurable) or a `messages` list
(`role` / `content`, roles system, user, assistant). The run's chat template (tokenizer/chat_template.py)
turns it into one token sequence starting and ending with <|endoftext|>; only answer tokens (and
the <|endoftext|> that ends the example) are targets, every other label is IGNORE_INDEX.

Training rows (`SFTRows`) hold whole examples: in pack mode as many as fit in seq_len + 1 tokens,
one after the other (each example's leading <|endoftext|> is the previous one's end, so the story
mask keeps them from attending to each other), in pad mode one per row. An example longer than a
row keeps its beginning and loses the end of its answer (counted and logged); one whose prompt
leaves no room for a single answer token is refused. Held-out examples are scored one per row, so
the validation loss, perplexity and bits per byte are those of the held-out answers.

Instruction sets are small next to pre-training corpora: they are read and tokenized in memory,
split by record exactly as stories are (`split_assignment`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import numpy as np

from cairn.util import jsonl
from cairn.tokenizer.chat_template import ChatTemplate, check_messages, encode_conversation
from cairn.config.sections import ChatConfig, DataConfig, RunConfig
from cairn.data.formats.base import MainFirst, Rows, RunDatasets
from cairn.util.errors import CairnError, option
from cairn.util.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
from cairn.tokenizer.base import Tokenizer
from cairn.data.sources import resolve_files
from cairn.data.splits import SPLITS, split_assignment

log = logging.getLogger(__name__)



def record_messages(record: object, d: DataConfig, where: str) -> list[dict]:
    """One record as a conversation ending with the assistant's answer, or one line saying what is wrong."""
    if not isinstance(record, dict):
        raise CairnError(f"{where}: not a JSON object: give {{\"{d.prompt_field}\": ..., \"{d.response_field}\": ...}}")
    if d.messages_field in record:
        messages = check_messages(record[d.messages_field], where)
        if messages[-1]["role"] != "assistant":
            raise CairnError(f"{where}: the last message must be the assistant's answer (got role "
                             f"{messages[-1]['role']!r})")
    else:
        missing = [f for f in (d.prompt_field, d.response_field) if not isinstance(record.get(f), str)]
        if missing:
            raise CairnError(f"{where}: no text field {' or '.join(repr(f) for f in missing)}: give "
                             f"\"{d.prompt_field}\" and \"{d.response_field}\" (or \"{d.messages_field}\"), or name "
                             f"the fields with {option('data.prompt_field')} / {option('data.response_field')}")
        messages = [{"role": "user", "content": record[d.prompt_field]},
                    {"role": "assistant", "content": record[d.response_field]}]
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise CairnError(f"{where}: the response{f' (message {k})' if d.messages_field in record else ''} is "
                             "empty: give every example an answer to learn, or drop the record")
    return messages


def read_records(d: DataConfig) -> list[list[dict]]:
    """Every record of the .jsonl source(s), in file order."""
    found = resolve_files(d.source)
    if found is None:
        raise CairnError(f"data.format sft reads local .jsonl files, and {d.source!r} is not one: "
                         f"pass {option('data.source')} FILE.jsonl")
    conversations = []
    for path in found[1]:
        if not path.name.lower().endswith(".jsonl"):
            raise CairnError(f"data.format sft reads JSON Lines, and {path} is not a .jsonl file: convert it")
        for n, record in jsonl.records(path, "instruction data file"):
            conversations.append(record_messages(record, d, f"{path}:{n}"))
    if not conversations:
        raise CairnError(f"{d.source} holds no records: put one JSON object per line")
    return conversations


@dataclass
class Example:
    ids: np.ndarray  # int64, starting with <|endoftext|>
    target: np.ndarray  # bool per id: an answer token (a label to learn)
    cut: bool = False  # the answer was cut to fit a row (no <|endoftext|> at its end)


def tokenize(conversation: list[dict], template: ChatTemplate, tokenizer: Tokenizer, seq_len: int,
             where: str) -> Example:
    """One example, cut to a row of seq_len inputs; refused when its prompt leaves no room for an answer."""
    ids, target = encode_conversation(template, tokenizer, conversation)
    first = target.index(True)  # the first answer token: ids[first] is the label of input `first - 1`
    if first > seq_len:
        raise CairnError(f"{where}: the prompt is {first - 1} tokens long, leaving no room for any response token "
                         f"in rows of {seq_len} tokens ({option('data.seq_len')}, at most the context length): "
                         "shorten the prompt "
                         f"or raise {option('data.seq_len')}")
    cut = len(ids) > seq_len + 1
    return Example(np.asarray(ids[:seq_len + 1], dtype=np.int64), np.asarray(target[:seq_len + 1], dtype=bool), cut)


@dataclass
class SFTSplit:
    examples: list[Example]
    conversations: list[list[dict]]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(e.ids) for e in self.examples))

    @property
    def n_targets(self) -> int:
        return int(sum(int(e.target[1:].sum()) for e in self.examples))


@dataclass
class SFTData:
    """The three splits of an instruction set, as `PreparedData` holds a corpus's."""
    train: SFTSplit
    val: SFTSplit
    test: SFTSplit
    cache_dir: str = "(in memory)"
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> SFTSplit:
        return getattr(self, name)


def prepare_sft(d: DataConfig, chat: ChatConfig, seed: int, tokenizer: Tokenizer) -> SFTData:
    template = ChatTemplate.from_config(chat)
    conversations = read_records(d)
    assign = split_assignment(len(conversations), seed, d.n_samples, d.train_frac, d.val_frac)
    splits, cut = {}, 0
    for k, name in enumerate(SPLITS):
        picked = np.flatnonzero(assign == k).tolist()
        convs = [conversations[i] for i in picked]
        examples = [tokenize(c, template, tokenizer, d.seq_len, f"{d.source} record {i + 1}")
                    for i, c in zip(picked, convs)]
        cut += sum(e.cut for e in examples)
        splits[name] = SFTSplit(examples, convs)
    if cut:
        log.info(f"sft: {cut} examples are longer than a row of {d.seq_len} tokens: their answers are cut there")
    digest = hashlib.sha256(json.dumps(conversations, sort_keys=True).encode()).hexdigest()[:16]
    meta = {"format": "sft", "records": len(conversations), "content": digest, "cut_examples": cut,
            "splits": {name: {"stories": len(s.examples), "tokens": s.n_tokens, "answer_tokens": s.n_targets}
                       for name, s in splits.items()}}
    log.info("sft: " + ", ".join(f"{name} {len(s.examples):,} examples / {s.n_targets:,} answer tokens"
                                 for name, s in splits.items()))
    return SFTData(splits["train"], splits["val"], splits["test"], meta=meta)


def _pack(examples: list[Example], seq_len: int) -> list[list[int]]:
    """Examples (by index) grouped into rows of at most seq_len + 1 tokens, in order, none split."""
    rows: list[list[int]] = []
    room = 0
    for i, e in enumerate(examples):
        need = len(e.ids) - 1  # its leading <|endoftext|> is the previous example's last token
        if rows and not examples[rows[-1][-1]].cut and not e.cut and need <= room:
            rows[-1].append(i)
            room -= need
        else:
            rows.append([i])
            room = seq_len + 1 - len(e.ids)
    return rows


class SFTRows:
    """Training or held-out rows of whole examples: input_ids and labels (IGNORE_INDEX but on
    answer tokens), of up to seq_len tokens; `ragged` rows are padded per batch (collate_padded)."""

    ragged = True

    def __init__(self, split: SFTSplit, seq_len: int, pack: bool):
        self.split, self.seq_len = split, seq_len
        self.rows = _pack(split.examples, seq_len) if pack else [[i] for i in range(len(split.examples))]

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return len(self.rows) > 0

    def lengths(self) -> np.ndarray:
        """Each row's number of inputs, from its examples' lengths (no row is built): scoring batches
        rows by length at every evaluation."""
        sizes = np.array([len(e.ids) for e in self.split.examples], dtype=np.int64)
        # a packed example after the first shares its leading <|endoftext|>; a row's inputs drop its last token
        return np.array([int(sizes[r].sum()) - (len(r) - 1) - 1 for r in self.rows], dtype=np.int64)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.split.examples[k] for k in self.rows[i]]
        ids = np.concatenate([parts[0].ids] + [p.ids[1:] for p in parts[1:]])
        target = np.concatenate([parts[0].target] + [p.target[1:] for p in parts[1:]])
        return ids, target

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import torch

        if not 0 <= i < len(self.rows):
            raise IndexError(f"row {i} out of range ({len(self.rows)} rows)")
        ids, target = self.row(i)
        labels = np.where(target[1:], ids[1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(ids[:-1].copy()), "labels": torch.from_numpy(labels)}


def sample_conversations(data: SFTData, n: int) -> list[list[dict]]:
    """Up to `n` held-out conversations without their last answer: prompts to show a tuned model's answers."""
    pool: Optional[SFTSplit] = next((s for s in (data.val, data.test, data.train) if s.examples), None)
    return [c[:-1] for c in pool.conversations[:n]] if pool else []


class SFTFormat:
    """Instruction records: whole examples per row, the loss on the answers only."""
    name = "sft"
    learns_tokenizer = False  # a tokenizer learned on a few instructions would not read stories
    chat = True

    def prepare(self, cfg: RunConfig, tokenizer: Tokenizer, main_first: MainFirst) -> RunDatasets:
        d = cfg.data
        data = prepare_sft(d, cfg.chat, cfg.seed, tokenizer)
        train = SFTRows(data.train, d.seq_len, pack=d.batching == "pack")
        val, test = (SFTRows(split, d.seq_len, pack=False) or None for split in (data.val, data.test))
        return RunDatasets(train, val, test, data.cache_dir, dict(data.meta), "rows",
                           conversations=sample_conversations(data, cfg.eval.end_stories))

    def held_out(self, cfg: RunConfig, tokenizer: Tokenizer, data: Optional[str], split: str) -> tuple[Rows, str]:
        prepared = prepare_sft(replace(cfg.data, source=data) if data is not None else cfg.data, cfg.chat, cfg.seed,
                               tokenizer)
        if data is not None:
            examples = SFTSplit([e for name in SPLITS for e in prepared.split(name).examples], [])
            what = f"{data} ({len(examples.examples)} examples)"
        else:
            examples = prepared.split(split)
            what = f"{split} split ({len(examples.examples)} examples)"
        if not examples.examples:
            raise CairnError(f"the run's {split} split is empty: score the val split, or other data")
        return SFTRows(examples, cfg.data.seq_len, pack=False), what


SFT_FORMAT = SFTFormat()
