"""Text generation (the tutorial's announced part 3): greedy, temperature, top-k, top-p, KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .errors import CairnError
from .model import KVCache, Transformer
from .tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy (always the most likely token)
    top_k: int = 0  # keep only the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1 = all)
    seed: int = 1234
    stop_at_eot: bool = True

    def check(self, flags: bool = False) -> "SamplingConfig":
        """Raise CairnError for a setting that cannot sample (named as a CLI flag when `flags`)."""
        def name(field: str) -> str:
            return "--" + field.replace("_", "-") if flags else field

        if self.max_new_tokens <= 0:
            raise CairnError(f"{name('max_new_tokens')} must be positive, got {self.max_new_tokens}: "
                             "ask for at least 1 token")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise CairnError(f"{name('temperature')} must be zero (greedy) or a positive number, "
                             f"got {self.temperature}: use e.g. 0.8")
        if self.top_k < 0:
            raise CairnError(f"{name('top_k')} must be zero (off) or more, got {self.top_k}: use e.g. 50")
        if not (0 < self.top_p <= 1):  # also false for nan
            raise CairnError(f"{name('top_p')} must be in (0, 1], got {self.top_p}: use e.g. 0.9, or 1 for off")
        if not -2**63 <= self.seed < 2**64:
            raise CairnError(f"{name('seed')} {self.seed} is out of range: use a number from 0 to 2**64 - 1")
        return self


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
        nxt = int(pick_next(logits[:, -1, :], s, generator))
        if s.stop_at_eot and eot_id is not None and nxt == eot_id:
            return
        ids.append(nxt)
        yield nxt


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, s: SamplingConfig,
                  on_text: Optional[Callable[[str], None]] = None, use_cache: bool = True) -> str:
    """Generate a continuation of `prompt`; `on_text` receives each piece of text as it is decoded.

    The prompt follows an <|endoftext|>, as every story does in training, so the model knows a
    story starts there.
    """
    prompt_ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    new: list[int] = []
    shown = ""
    for tok in generate_ids(model, prompt_ids, s, tokenizer.eot_id, use_cache):
        new.append(tok)
        text = tokenizer.decode(new)
        # a multi-byte character may be split across tokens: wait until it decodes whole
        if on_text is not None and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(new)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
