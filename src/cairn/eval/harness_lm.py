"""A cairn model as an lm-evaluation-harness `LM` (registered as "cairn"): loglikelihood,
loglikelihood_rolling and generate_until computed by cairn's own model and tokenizer.

Why not lm-eval's HFLM over a Hugging Face export: every cairn model scores here (mixed blocks
and LoRA adapters have no Hugging Face form), nothing is written to disk first, the tokenizer is
the run's own, the model computes in the precision `cairn eval` uses, and rolling perplexity reads
each text in the sliding windows `cairn eval` reads held-out stories in (HFLM cuts a long text into
disjoint windows, so the first tokens of each window are scored with almost no context).

Requests are read as cairn reads stories: every context follows <|endoftext|>, the token before
every story in training. The model reads at most the run's `seq_len` tokens at once, the length it
trained on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cairn.checkpoint.load import Loaded, load
from cairn.data.batching import SCORE_TOKENS
from cairn.inference.generate import TextStream
from cairn.inference.sampling import SamplingConfig
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast
from cairn.runtime.precision import for_checkpoint
from cairn.tokenizer.base import Tokenizer
from cairn.util.errors import CairnError

# A batch's logits (every position's) are capped at this many values (256 MB in float32), whatever
# the vocabulary.
LOGIT_VALUES = 1 << 26


@dataclass(frozen=True)
class Window:
    """One row to score: `tokens[:-1]` are read, and the last `scored` of the targets `tokens[1:]` count."""
    tokens: list[int]
    scored: int


def windows(ids: Sequence[int], first: int, seq_len: int, stride: int) -> list[Window]:
    """Rows that score the targets `ids[first + 1:]` (each token from the tokens before it) once
    each, reading at most `seq_len` tokens, as `StoryWindows` scores a held-out story: a window
    scores the targets up to `seq_len` (all with the whole text before them as context), then
    each later one the next `stride` targets with the `seq_len - stride` tokens before them."""
    n = len(ids) - 1  # targets: ids[1:]
    out, a = [], first
    while a < n:
        b = min(n, max(a + stride, seq_len))
        start = max(0, b - seq_len)
        out.append(Window(list(ids[start:b + 1]), b - a))
        a = b
    return out


def rolling_windows(ids: Sequence[int], eot_id: int, seq_len: int, stride: int) -> list[Window]:
    """The windows that score every token of a text once, after <|endoftext|>. They are cut as
    for the text followed by its <|endoftext|>, as `cairn eval` reads every story, and that last
    target is left out: each token is scored with exactly the context `cairn eval` gives it."""
    if not ids:
        return []
    out = windows([eot_id, *ids, eot_id], 0, seq_len, stride)
    last = out.pop()
    if last.scored > 1:
        out.append(Window(last.tokens[:-1], last.scored - 1))
    return out


@register_model("cairn")
class CairnLM(LM):
    """lm-eval's view of a loaded cairn run. `precision` defaults to the one `cairn eval` uses for
    this checkpoint; `batch_tokens` caps the positions read per forward pass."""

    def __init__(self, loaded: Loaded, precision: Optional[str] = None, batch_tokens: int = SCORE_TOKENS) -> None:
        super().__init__()
        self.loaded = loaded
        self.model: Transformer = loaded.model.eval()
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.eot_id = self.tokenizer.eot_id
        self.seq_len = loaded.config.data.seq_len
        self.stride = max(1, self.seq_len // 2)  # StoryWindows' default, as `cairn eval` scores
        self._device = loaded.device
        self.precision = precision or for_checkpoint(loaded.config.system.precision, loaded.device, loaded.path)
        self.batch_tokens = max(int(batch_tokens), self.seq_len + 1)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "CairnLM":
        """`lm_eval --model cairn --model_args path=RUN[,device=cpu][,precision=fp32]`."""
        args = dict(part.split("=", 1) for part in arg_string.split(",") if part)
        if "path" not in args:
            raise CairnError("the cairn model needs model_args path=RUN_DIR_OR_CHECKPOINT")
        device = args.get("device") or (additional_config or {}).get("device") or "auto"
        return cls(load(args["path"], device), precision=args.get("precision"))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", "cairn"))

    def get_model_info(self) -> dict[str, str]:
        return {"checkpoint": str(self.loaded.path), "precision": self.precision}

    # ------------------------------------------------------------ scoring

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids after <|endoftext|>, continuation ids), split as lm-eval's HFLM splits them:
        spaces that end the context belong to the continuation, and the continuation's tokens are
        those of the whole text past the context's own."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context)) if context else 0
        return [self.eot_id, *whole[:n_context]], whole[n_context:]

    @torch.no_grad()
    def _score(self, items: Sequence[Window]) -> list[tuple[float, bool]]:
        """Each window's summed log-probability of its scored targets, and whether every one of
        them is the model's most likely token. Windows are read longest first, in batches of
        similar length that pad little; the results come back in the order given."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i].tokens))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        vocab = self.model.cfg.vocab_size
        start = 0
        while start < len(order):
            width = len(items[order[start]].tokens) - 1  # the longest row of this batch
            rows = max(1, min(self.batch_tokens // width, LOGIT_VALUES // (width * vocab)))
            batch = order[start:start + rows]
            start += len(batch)
            x = torch.full((len(batch), width), self.eot_id, dtype=torch.long)
            for r, i in enumerate(batch):
                row = items[i].tokens[:-1]
                x[r, :len(row)] = torch.tensor(row)
            with autocast(self._device, self.precision):
                logits = self.model(x.to(self._device))
            for r, i in enumerate(batch):
                w = items[i]
                n = len(w.tokens) - 1
                target = torch.tensor(w.tokens[n - w.scored + 1:], device=logits.device)
                # only the scored positions: a choice's few tokens after a context of hundreds
                lp = torch.log_softmax(logits[r, n - w.scored:n].float(), dim=-1)
                picked = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                out[i] = (float(picked.sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        per_request: list[list[Window]] = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._pair(context, continuation)
            if len(cont) <= self.seq_len:  # one window, with as much of the context's end as fits (HFLM's)
                per_request.append([Window([*ctx, *cont][-(self.seq_len + 1):], len(cont))] if cont else [])
            else:  # as rolling perplexity reads a long text
                per_request.append(windows([*ctx, *cont], len(ctx) - 1, self.seq_len, self.stride))
        flat = self._score([w for ws in per_request for w in ws])
        results, k = [], 0
        for ws in per_request:
            part = flat[k:k + len(ws)]
            k += len(ws)
            results.append((sum(lp for lp, _ in part), all(g for _, g in part)))
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        per_text = [rolling_windows(self.tokenizer.encode(req.args[0]), self.eot_id, self.seq_len, self.stride)
                    for req in requests]
        flat = self._score([w for ws in per_text for w in ws])
        results, k = [], 0
        for req, ws in zip(requests, per_text):
            total = sum(lp for lp, _ in flat[k:k + len(ws)])
            k += len(ws)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False))
            s = SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                               temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                               top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
                               top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0,
                               stop=tuple(until))
            stream = TextStream(self.model, self.tokenizer, context, s)
            for _ in stream:
                pass
            out.append(stream.text)
            self.cache_hook.add_partial("generate_until", req.args, stream.text)
        return out
