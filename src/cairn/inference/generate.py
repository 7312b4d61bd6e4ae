"""Text generation (the tutorial's announced part 3): greedy, temperature, top-k, top-p, repetition
penalty, KV cache; and `TextStream`, the text as it is written, with stop strings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from cairn.util import jsonl
from cairn.util.errors import CairnError
from cairn.model.transformer import KVCache, Transformer
from cairn.tokenizer.base import Tokenizer
from cairn.inference.sampling import SamplingConfig  # also importable from here, with what it configures


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: [B, V]."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """The tokens in `seen` made less likely by `penalty` (CTRL's rule: a positive logit is divided
    by it, a negative one multiplied). logits: [1, V]."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[0, idx]
    logits = logits.clone()
    logits[0, idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def pick_next(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    logits = logits.float()
    if s.temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    # shifted so the largest is 0: a tiny temperature then sends the others to -inf, never to NaN
    logits = filter_logits((logits - logits.max(dim=-1, keepdim=True).values) / s.temperature, s.top_k, s.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_ids(model: Transformer, prompt: list[int], s: SamplingConfig, eot_id: Optional[int] = None,
                 use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time. A prompt longer than the context keeps its end.

    With the cache, each step feeds only the new token. Once the context is full, the oldest
    tokens must drop out, and with absolute positions every kept token then moves: the cache is
    invalid, so from there on each step recomputes the last context_len tokens (as nanoGPT does).
    """
    s.check()
    model.eval()
    ctx = model.cfg.context_len
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(s.seed)
    ids = list(prompt)[-ctx:]
    cache = KVCache(model.cfg, 1, device, next(model.parameters()).dtype) if use_cache else None
    fed = 0  # tokens of `ids` already in the cache
    for _ in range(s.max_new_tokens):
        if cache is not None and len(ids) <= ctx:
            logits = model(torch.tensor([ids[fed:]], device=device), cache)
            fed = len(ids)
        else:
            logits = model(torch.tensor([ids[-ctx:]], device=device))
        last = penalize_repeats(logits[:, -1, :].float(), ids, s.repetition_penalty)
        nxt = int(pick_next(last, s, generator))
        if s.stop_at_eot and eot_id is not None and nxt == eot_id:
            return
        ids.append(nxt)
        yield nxt


class TextPieces:
    """Decoded text of generated tokens, handed out as it becomes final: `push` a token, get the
    text that can be shown now. A piece never ends inside a multi-byte character, and a stop
    string is never handed out: text that could still become one is held back until it cannot.
    After a push returns `stopped`, `text` is the text before the stop string; `finish()` hands
    out what was held back when the tokens ended without one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [x for x in stop if x]
        self.ids: list[int] = []
        self.text, self.stopped = "", False
        self._shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        end = self._stop_at(text)
        if end is not None:
            self.stopped, text = True, text[:end]
        elif text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for its end
            return ""
        self.text = text
        return self._hand_out(len(text) if end is not None else len(text) - self._held_back(text))

    def finish(self) -> str:
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._hand_out(len(self.text))

    def _hand_out(self, ready: int) -> str:
        piece = self.text[self._shown:ready] if ready > self._shown else ""
        self._shown = max(self._shown, ready)
        return piece

    def _stop_at(self, text: str) -> Optional[int]:
        hits = [i for i in (text.find(x) for x in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """The longest end of `text` that is the beginning of a stop string."""
        return max((k for x in self.stop for k in range(1, len(x)) if text.endswith(x[:k])), default=0)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The tokens a continuation of `prompt` starts from: <|endoftext|>, as before every story in
    training, so the model knows a story starts there, then the prompt's."""
    return [tokenizer.eot_id] + tokenizer.encode(prompt)


class TextStream:
    """The text a model writes after `prompt`, piece by piece as it is decoded: iterate over it.
    Afterwards `text`, `tokens` (generated), `finish_reason` ("stop": a stop string was written,
    "eot": the model ended the story, "length": max_new_tokens) and `seconds` describe it.
    The pieces are those of `TextPieces` (no broken character, no stop string: `s.stop`, or `stop`
    when given); the prompt follows an <|endoftext|> (`prompt_ids`)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prompt: str, s: SamplingConfig,
                 stop: Optional[Sequence[str]] = None, use_cache: bool = True,
                 prompt_ids: Optional[Sequence[int]] = None) -> None:
        self.model, self.tokenizer, self.prompt, self.s, self.use_cache = model, tokenizer, prompt, s, use_cache
        # `prompt_ids`: the prompt already as tokens (a chat template's rendering), used instead of `prompt`
        self.prompt_ids = None if prompt_ids is None else list(prompt_ids)
        self.stop = [x for x in (s.stop if stop is None else stop) if x]
        self.text, self.tokens, self.finish_reason, self.seconds = "", 0, "", 0.0

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        pieces = TextPieces(self.tokenizer, self.stop)
        self.finish_reason = "eot"
        ids = self.prompt_ids if self.prompt_ids is not None else prompt_ids(self.tokenizer, self.prompt)
        for tok in generate_ids(self.model, ids, self.s, self.tokenizer.eot_id, self.use_cache):
            piece = pieces.push(tok)
            self.text = pieces.text
            if piece:
                yield piece
            if pieces.stopped:
                self.finish_reason = "stop"
                break
        else:
            if len(pieces.ids) == self.s.max_new_tokens:
                self.finish_reason = "length"
            piece = pieces.finish()
            self.text = pieces.text
            if piece:
                yield piece
        self.tokens = len(pieces.ids)
        self.seconds = time.perf_counter() - start


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, s: SamplingConfig,
                  on_text: Optional[Callable[[str], None]] = None, use_cache: bool = True,
                  prompt_ids: Optional[Sequence[int]] = None) -> str:
    """The continuation of `prompt` (a `TextStream` read to its end); `on_text` receives each piece."""
    stream = TextStream(model, tokenizer, prompt, s, use_cache=use_cache, prompt_ids=prompt_ids)
    for piece in stream:
        if on_text is not None:
            on_text(piece)
    return stream.text


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSON Lines with a "prompt" field (.jsonl), else one prompt per line
    (blank lines skipped)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for n, record in jsonl.records(path, "prompt file"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise CairnError(f"{path}:{n}: no text field 'prompt': give {{\"prompt\": \"...\"}} on each line")
            prompts.append(record["prompt"])
    else:
        prompts = [line for line in jsonl.read_lines(path, "prompt file") if line.strip()]
    if not prompts:
        raise CairnError(f"prompt file {str(path)!r} holds no prompt: put one prompt per line")
    return prompts
