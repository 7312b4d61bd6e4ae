"""`cairn bench`: training-step and generation throughput, cairn against plain PyTorch references.

Every variant is timed in the same process, alternating rounds (A B C A B C ...), so that a noisy
machine slows all of them alike; the table reports the median step of each and ratios to the
first reference. Two references are written here in plain PyTorch:

- `nanogpt`: an eager float32 nanoGPT-style step (fused q/k/v, SDPA, tied embeddings, full
  float32 logits and F.cross_entropy), the usual baseline for a small GPT on one machine;
- `tutorial`: the reference tutorial's model as it writes it (per-head q/k/v linears, attention by
  bmm + softmax without a mask, separate heads concatenated), fed as it feeds it: one story per
  row, every row padded to 1000 tokens. Only the real story tokens are "useful".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .model import Transformer, sinusoidal_table
from .runtime import measured_matmul_flops, set_threads


# ---------------------------------------------------------------- references

class NanoGPTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, 2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, ctx):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(NanoGPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class TutorialHead(nn.Module):
    def __init__(self, d, hd):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, hd), nn.Linear(d, hd), nn.Linear(d, hd)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        w = F.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.size(-1)), dim=-1)
        return torch.bmm(w, v)


class TutorialBlock(nn.Module):
    def __init__(self, d, h, mlp):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.heads = nn.ModuleList(TutorialHead(d, d // h) for _ in range(h))
        self.out = nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        a = self.ln_1(x)
        x = x + self.out(torch.cat([h(a) for h in self.heads], dim=-1))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class Tutorial(nn.Module):
    def __init__(self, vocab, d, layers, heads, mlp, ctx):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.register_buffer("pe", sinusoidal_table(ctx, d))
        self.blocks = nn.ModuleList(TutorialBlock(d, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.pe  # only works at exactly the padded length, as in the tutorial
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        # the tutorial's loss: every position, padding included
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets[:, 1:].reshape(-1))


# ---------------------------------------------------------------- timing

@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    tokens: int  # tokens processed per step
    useful: int  # real (non-padding) target tokens per step
    flops: float  # model FLOPs per step (6N + attention), for MFU
    times: list


def make_step(model, opt, loss_fn):
    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def story_lengths(n: int, seed: int = 0) -> np.ndarray:
    """GPT-2 token lengths of TinyStories stories: from the shared sample when present, else a
    log-normal with the sample's mean (~206 tokens)."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories" / "sample-train-v1.jsonl"
    rng = np.random.default_rng(seed)
    if sample.is_file():
        from .tokenizer import gpt2

        tok = gpt2()
        texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()[:400]]
        lengths = np.array([len(t) + 1 for t in tok.encode_batch(texts)])
        return rng.choice(lengths, n)
    return np.clip(rng.lognormal(math.log(190), 0.4, n), 20, 999).astype(int)


def bench_training(d, layers, heads, seq, batch, vocab, rounds, variants, tutorial_batch) -> list[Variant]:
    torch.manual_seed(0)
    out = []
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))
    if "nanogpt" in variants:
        m = NanoGPT(vocab, d, layers, heads, seq)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        n = sum(p.numel() for mod in m.modules() if isinstance(mod, nn.Linear) for p in [mod.weight])
        out.append(Variant("nanogpt", make_step(m, opt, lambda m=m: m(x, y)), batch * seq, batch * seq,
                           (6 * n + 12 * layers * d * seq) * batch * seq, []))
    if "cairn" in variants:
        cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_mlp=4 * d, context_len=seq)
        m = Transformer(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        fl = m.flops_per_token(seq) * batch * seq
        out.append(Variant("cairn", make_step(m, opt, lambda m=m: (lambda s: s[0] / s[1])(m(x, labels=y))),
                           batch * seq, batch * seq, fl, []))
    if "tutorial" in variants:
        ctx = 1000
        m = Tutorial(vocab, d, layers, heads, 4 * d, ctx)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        lengths = story_lengths(tutorial_batch)
        xt = torch.randint(0, vocab, (tutorial_batch, ctx))
        for i, n_real in enumerate(lengths):
            xt[i, n_real:] = 0
        n = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
        out.append(Variant("tutorial", make_step(m, opt, lambda m=m: m(xt, xt)), tutorial_batch * ctx,
                           int((lengths - 1).sum()), (6 * n + 12 * layers * d * ctx) * tutorial_batch * ctx, []))
    for v in out:  # warm-up step each
        v.step()
    for _ in range(rounds):
        for v in out:
            t = time.perf_counter()
            v.step()
            v.times.append(time.perf_counter() - t)
    return out


@torch.no_grad()
def bench_generation(d, layers, heads, vocab, new_tokens, prompt_len=16) -> dict:
    from .generate import SamplingConfig, generate_ids

    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_mlp=4 * d,
                      context_len=max(prompt_len + new_tokens, 32))
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    s = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    prompt = list(range(1, prompt_len + 1))
    res = {}
    outs = {}
    for name, cache in (("kv_cache", True), ("recompute", False), ("kv_cache", True), ("recompute", False)):
        t = time.perf_counter()
        outs[name] = list(generate_ids(m, prompt, s, use_cache=cache))
        res.setdefault(name, []).append(time.perf_counter() - t)
    assert outs["kv_cache"] == outs["recompute"], "cached and recomputed decoding disagree"
    return {k: new_tokens / min(v) for k, v in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cairn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant (alternating)")
    p.add_argument("--variants", default="nanogpt,cairn", help="comma list of nanogpt, cairn, tutorial")
    p.add_argument("--tutorial-batch", type=int, default=2, help="rows of 1000 tokens for the tutorial step")
    p.add_argument("--generate", type=int, default=256, help="tokens to generate in the decoding benchmark (0 = skip)")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    set_threads(0)
    peak = measured_matmul_flops(n=2048, repeats=10)
    print(f"# shape d{a.d_model} L{a.n_layers} H{a.n_heads} T{a.seq_len} B{a.batch_size} V{a.vocab_size}; "
          f"{torch.get_num_threads()} threads; measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    variants = bench_training(a.d_model, a.n_layers, a.n_heads, a.seq_len, a.batch_size, a.vocab_size, a.rounds,
                              a.variants.split(","), a.tutorial_batch)
    rows = []
    base = None
    print(f"{'variant':<10} {'s/step':>8} {'tok/s':>9} {'useful tok/s':>13} {'MFU':>6} {'vs first':>9} {'useful vs first':>16}")
    for v in variants:
        t = statistics.median(v.times)
        r = {"variant": v.name, "s_per_step": t, "tokens_per_s": v.tokens / t, "useful_tokens_per_s": v.useful / t,
             "mfu": v.flops / t / peak, "steps": v.times}
        base = base or r
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["useful_speedup"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        rows.append(r)
        print(f"{v.name:<10} {t:8.3f} {r['tokens_per_s']:9.0f} {r['useful_tokens_per_s']:13.0f} {r['mfu']:6.1%} "
              f"{r['speedup']:8.2f}x {r['useful_speedup']:15.2f}x")
    result = {"shape": vars(a), "peak_flops": peak, "training": rows}
    if a.generate:
        g = bench_generation(a.d_model, a.n_layers, a.n_heads, a.vocab_size, a.generate)
        result["generation_tokens_per_s"] = g
        print(f"generation of {a.generate} tokens: KV cache {g['kv_cache']:.1f} tok/s, full recomputation "
              f"{g['recompute']:.1f} tok/s: {g['kv_cache'] / g['recompute']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
