"""The plain-PyTorch models `cairn bench` times cairn's against; reference code, never trained with.

- `NanoGPT`: a nanoGPT-style GPT (fused q/k/v, SDPA, GELU MLP, tied embeddings, full float32
  logits and F.cross_entropy), the usual baseline for a small GPT on one machine;
- `Tutorial`: the reference tutorial's model as it writes it (per-head q/k/v linears, attention by
  bmm + softmax without a mask, separate heads concatenated, sinusoidal positions added at unit
  amplitude), fed as it feeds it: one story per row, every row padded to a fixed width, the loss
  taken on every position, padding included. `story_lengths` gives the rows' real lengths.

Both take (token ids, targets) and return the mean loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cairn.model.transformer import sinusoidal_table


class NanoGPTBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, 2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(NanoGPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class TutorialHead(nn.Module):
    def __init__(self, d: int, hd: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, hd), nn.Linear(d, hd), nn.Linear(d, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        w = F.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.size(-1)), dim=-1)
        return torch.bmm(w, v)


class TutorialBlock(nn.Module):
    def __init__(self, d: int, h: int, mlp: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.heads = nn.ModuleList(TutorialHead(d, d // h) for _ in range(h))
        self.out = nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln_1(x)
        x = x + self.out(torch.cat([h(a) for h in self.heads], dim=-1))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class Tutorial(nn.Module):
    pe: torch.Tensor

    def __init__(self, vocab: int, d: int, layers: int, heads: int, mlp: int, ctx: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.register_buffer("pe", sinusoidal_table(ctx, d))
        self.blocks = nn.ModuleList(TutorialBlock(d, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.pe  # only works at exactly the padded length, as in the tutorial
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        # the tutorial's loss: every position, padding included
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets[:, 1:].reshape(-1))


def linear_weights(model: nn.Module) -> int:
    """The weights of a model's nn.Linear layers: 6 FLOPs each per token of a training step."""
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))


def story_lengths(n: int, seed: int = 0) -> np.ndarray:
    """GPT-2 token lengths (with the <|endoftext|>) of n TinyStories stories: drawn from the first
    400 stories of the TinyStories sample ($CAIRN_TINYSTORIES, else ../shared/data/tinystories
    beside the checkout) when present, else from a log-normal with the sample's mean (~206 tokens)."""
    default = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinystories"
    sample = Path(os.environ.get("CAIRN_TINYSTORIES", default)) / "sample-train-v1.jsonl"
    rng = np.random.default_rng(seed)
    if sample.is_file():
        from cairn.tokenizer.base import gpt2

        tok = gpt2()
        texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()[:400]]
        lengths = np.array([len(t) + 1 for t in tok.encode_batch(texts)])
        return rng.choice(lengths, n)
    return np.clip(rng.lognormal(math.log(190), 0.4, n), 20, 999).astype(int)
