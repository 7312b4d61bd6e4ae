"""`cairn eval RUN --task words --data F`: does the model write stories that use the words asked for?

F holds JSONL records with a `prompt` ("Write a story that uses the words: w1, w2, w3.") and its
`words` (and, optionally, the held-out story they were taken from as `response`: then the prompt
gain below is reported too). Each prompt is put through the run's chat template (the one it was tuned with; a base run
gets the default template, the same text) and one story is sampled per prompt with a fixed seed
(the record's position + --seed). A story honours its prompt when every word occurs in it as a
whole word, case-insensitively ("cat" is not found in "cats" or "scatter"). The figure is the
fraction of prompts honoured.
"""

from __future__ import annotations

import bisect
import itertools
import re
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypedDict

from cairn.util import jsonl
from cairn.tokenizer.base import Tokenizer
from cairn.tokenizer.chat_template import ChatTemplate, instruction
from cairn.util.errors import CairnError, option
from cairn.inference.generate import TextStream
from cairn.inference.sampling import WORDS, SamplingConfig
from cairn.checkpoint.load import Loaded, load

WORD = re.compile(r"[A-Za-z]+")


class _Asked(TypedDict):
    prompt: str
    words: list[str]


class WordPrompt(_Asked, total=False):
    """A record of the prompts file: the prompt, its words, and the held-out story they came from."""
    response: str


class WordSample(TypedDict):
    """The story sampled for one prompt, and how many of its words it uses."""
    prompt: str
    words: list[str]
    seed: int
    story: str
    honoured: bool
    words_found: int
    finish_reason: str


class PromptGain(TypedDict):
    """`prompt_gain`'s measure: log-probabilities (nats per word token) after the right and another prompt."""
    records: int
    word_tokens: int
    logprob_right: float
    logprob_wrong: float
    gain: float


class SamplingRecord(TypedDict):
    temperature: float
    top_k: int
    max_new_tokens: int
    seeds: str


class WordsResult(TypedDict):
    """What `cairn eval --task words` reports (its --json line)."""
    checkpoint: str
    prompts: int
    honoured: int
    rate: float
    word_rate: float
    sampling: SamplingRecord
    prompt_gain: Optional[float]
    prompt_gain_tokens: Optional[int]
    seconds: float
    samples: list[WordSample]


def words_found(text: str, words: list[str]) -> int:
    """How many of `words` occur in `text` as whole words, case-insensitively."""
    present = {w.lower() for w in WORD.findall(text)}
    return sum(w.lower() in present for w in words)


def uses_all(text: str, words: list[str]) -> bool:
    return words_found(text, words) == len(words)


def read_word_prompts(path: str | Path) -> list[WordPrompt]:
    out: list[WordPrompt] = []
    for n, r in jsonl.records(path, "word prompts file (--data)"):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("words"), list)
                and r["words"] and all(isinstance(w, str) and WORD.fullmatch(w) for w in r["words"])):
            raise CairnError(f"{path}:{n}: needs a text 'prompt' and a list of 'words' (letters only), e.g. "
                             "{\"prompt\": \"Write a story that uses the words: cat, hat, sun.\", "
                             "\"words\": [\"cat\", \"hat\", \"sun\"]}")
        record = WordPrompt(prompt=r["prompt"], words=r["words"])
        if isinstance(r.get("response"), str):
            record["response"] = r["response"]
        out.append(record)
    if not out:
        raise CairnError(f"{option('data.source')} {str(path)!r} holds no prompt")
    return out


def evaluate_words(run: str | Path, data: str | Path, *, device: str = "auto", sampling: SamplingConfig = WORDS,
                   limit: int = 0, on_sample: Optional[Callable[[WordSample], None]] = None) -> WordsResult:
    """One story per prompt of `data` from the model at `run`, prompt i sampled with `sampling` and
    its seed + i; the fraction that use all their words."""
    sampling.check()
    prompts = read_word_prompts(data)[:limit or None]
    loaded = load(run, device, merge=True)
    template = ChatTemplate.from_config(loaded.config.chat)
    samples: list[WordSample] = []
    started = time.perf_counter()
    for p, s in zip(prompts, sampling.seeds(len(prompts))):
        stream = TextStream(loaded.model, loaded.tokenizer, p["prompt"], s,
                            prompt_ids=instruction(template, loaded.tokenizer, p["prompt"]))
        for _ in stream:
            pass
        sample = WordSample(prompt=p["prompt"], words=p["words"], seed=s.seed, story=stream.text,
                            honoured=uses_all(stream.text, p["words"]),
                            words_found=words_found(stream.text, p["words"]), finish_reason=stream.finish_reason)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
    honoured = sum(x["honoured"] for x in samples)
    asked = sum(len(p["words"]) for p in prompts)
    # records made from held-out stories (benchmarks/scripts/words_data.py keeps them) also give the prompt gain
    gain = prompt_gain(loaded, prompts) if len(prompts) > 1 and all("response" in p for p in prompts) else None
    return WordsResult(checkpoint=str(loaded.path), prompts=len(prompts), honoured=honoured,
                       rate=honoured / len(prompts), word_rate=sum(x["words_found"] for x in samples) / asked,
                       sampling=SamplingRecord(temperature=sampling.temperature, top_k=sampling.top_k,
                                               max_new_tokens=sampling.max_new_tokens, seeds=f"{sampling.seed}.."),
                       prompt_gain=None if gain is None else round(gain["gain"], 4),
                       prompt_gain_tokens=None if gain is None else gain["word_tokens"],
                       seconds=round(time.perf_counter() - started, 1), samples=samples)


def word_token_positions(tokenizer: Tokenizer, ids: list[int], start: int, words: list[str]) -> list[int]:
    """Indices into `ids` (from `start` on) of the tokens that spell an occurrence of one of `words`
    (whole word, case-insensitive): every token overlapping the word's bytes."""
    pieces = [tokenizer.decode_bytes([t]) for t in ids[start:]]
    ends = list(itertools.accumulate(len(p) for p in pieces))  # byte offset where each token ends
    text = b"".join(pieces)
    out: set[int] = set()
    for w in words:
        for m in re.finditer(rb"(?<![A-Za-z])" + re.escape(w.encode()) + rb"(?![A-Za-z])", text, re.I):
            first = bisect.bisect_right(ends, m.start())  # the token holding the word's first byte
            last = bisect.bisect_left(ends, m.end())  # the token holding its last byte
            out.update(range(start + first, start + last + 1))
    return sorted(out)


def prompt_gain(loaded: Loaded, records: Sequence[WordPrompt], limit: int = 0) -> PromptGain:
    """How much the model's prompt tells it about the asked words, teacher-forced on held-out stories.

    For each record (`prompt`, `words` and its story, `response`) the story is scored twice through
    the run's template: after its own prompt and after the next record's prompt (other words). The
    gain is the mean log-probability, in nats per token, that the right prompt adds to the tokens
    spelling the asked words in the story. A model that copies the asked words scores well above 0;
    sampling honours a prompt only when this is large, so it measures progress that the all-three
    rate cannot show while it is still 0."""
    import torch

    from cairn.tokenizer.chat_template import encode_conversation

    template = ChatTemplate.from_config(loaded.config.chat)
    recs = [r for r in records if isinstance(r.get("response"), str)][:limit or None]
    if len(recs) < 2:
        raise CairnError("prompt gain needs at least 2 records with the story ('response') they were made from")
    ctx = loaded.model.cfg.context_len
    totals = [0.0, 0.0]  # summed log-probability after the right prompt, after the other one
    tokens = 0
    for i, r in enumerate(recs):
        runs = []
        for prompt in (r["prompt"], recs[(i + 1) % len(recs)]["prompt"]):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["response"]}]
            ids, target = encode_conversation(template, loaded.tokenizer, messages)
            runs.append((ids, target.index(True)))
        # the story's tokens are the same after either prompt: score the part that fits after both
        story_len = min(min(len(ids), ctx + 1) - first for ids, first in runs)
        if story_len <= 0:
            continue
        ids, first = runs[0]
        at = [j - first for j in word_token_positions(loaded.tokenizer, ids[:first + story_len], first, r["words"])]
        if not at:
            continue
        for k, (ids, first) in enumerate(runs):
            ids = ids[:first + story_len]
            with torch.no_grad():
                logp = loaded.model(torch.tensor([ids[:-1]], device=loaded.device))[0].float().log_softmax(-1)
            rows = torch.tensor([first + j - 1 for j in at], dtype=torch.long, device=loaded.device)
            got = logp[rows, torch.tensor([ids[first + j] for j in at], device=loaded.device)].sum().item()
            totals[k] += got
        tokens += len(at)
    if not tokens:
        raise CairnError("none of the records' stories contains its words: give the records their stories")
    right, wrong = totals
    return PromptGain(records=len(recs), word_tokens=tokens, logprob_right=right / tokens,
                      logprob_wrong=wrong / tokens, gain=(right - wrong) / tokens)
