"""The decoder-only transformer of the reference tutorial, written to be read top to bottom.

By default it is GPT-2's architecture with the tutorial's three differences: fixed sinusoidal
positions, exact (erf) GELU and an untied output head. Its configuration (vocab 50257, width 768,
4 blocks, 12 heads, MLP 3072) counts 105,547,776 parameters, the tutorial's figure: one fused
q/k/v projection holds exactly the weights of the tutorial's twelve per-head q, k and v linears.

What it fixes in the tutorial: attention is causal; positions are taken for the actual length of
the input (and offset during cached decoding), so nothing has to be padded to the context length.

Switches beyond the tutorial (each a `ModelConfig` field; all four together are Llama's block):
rotary positions (`positions = "rope"`, the half-split "rotate_half" form Llama's checkpoints use),
RMSNorm, a SwiGLU MLP, bias-free linears, and tied input/output embeddings.
"""

from __future__ import annotations

import math
from typing import Optional, overload

import torch
import torch.nn as nn
import torch.nn.functional as F

from cairn.config.sections import ModelConfig
from cairn.util.errors import CairnError
from cairn.model.ops import IGNORE_INDEX, linear_cross_entropy
from cairn.runtime.device import available_memory


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """The fixed position table of "Attention Is All You Need": sin on even, cos on odd dims."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


INIT_STD = 0.02  # GPT-2's initialisation std for weights and embeddings
POS_SCALE = INIT_STD * math.sqrt(2)  # sin/cos rows have RMS 1/sqrt(2): this makes it INIT_STD


def rope_tables(n_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, [n_positions, head_dim], each angle twice
    (dims i and i + head_dim/2 are rotated together), as Llama computes them."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k ([B, H, T, hd]) by their positions' angles (cos/sin: [T, hd], or [B, 1, T, hd]
    when each row has its own positions)."""
    half = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q and k are bf16
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, cfg.n_heads, cfg.context_len, cfg.d_model // cfg.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # tokens already in the cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RowKVCache:
    """A KV cache whose rows hold different numbers of tokens (`lengths`), so that sequences that
    started at different times decode in one batch: each row's new tokens go at its own position
    and attend only to that row's tokens. A forward pass over B rows uses rows 0..B-1; `row(i)`
    fills one row on its own (a prompt's prefill) and `move` keeps the rows in use at the front."""

    def __init__(self, cfg: ModelConfig, rows: int, device: torch.device | str, dtype: torch.dtype):
        shape = (rows, cfg.n_heads, cfg.context_len, cfg.d_model // cfg.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = rows

    def positions(self, B: int, T: int) -> torch.Tensor:
        """[B, T]: the positions of the next T tokens of rows 0..B-1."""
        return self.lengths[:B, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H, T, hd]) after each row's tokens; return the keys and values up to the
        longest row, and the mask [B, 1, T, L] of what each new token may see."""
        B, _, T, _ = k.shape
        pos = self.positions(B, T)
        rows = torch.arange(B, device=pos.device)[:, None]
        # advanced indices around a slice put their dims first: [B, T, H, hd]
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        mask = torch.arange(end, device=pos.device) <= pos[:, :, None]  # [B, T, L]: own tokens, causal
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end], mask.unsqueeze(1)

    def row(self, i: int) -> KVCache:
        """A one-row KVCache over row i's buffers, empty: what it is fed lands in row i.
        Set `lengths[i]` to its `length` afterwards."""
        view = KVCache.__new__(KVCache)
        view.k = [t[i:i + 1] for t in self.k]
        view.v = [t[i:i + 1] for t in self.v]
        view.length = 0
        return view

    def move(self, src: int, dst: int) -> None:
        """Copy row src into row dst (to fill the gap a finished sequence leaves)."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: Optional[KVCache | RowKVCache] = None, layer: int = 0,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                story_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # rotated before caching: a cached key keeps its own position
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past, row_mask = 0, None
        if isinstance(cache, RowKVCache):
            k, v, row_mask = cache.update(layer, k, v)
        elif cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if story_mask is not None:  # causal, and only within each story
            mask, causal = story_mask, False
        elif row_mask is not None:  # each row sees its own tokens only, whatever its length
            mask, causal = row_mask, False
        elif past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token may see every cached one
        else:  # several new tokens after a cached prefix: causal within, all of the prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        dropout = self.dropout if self.training else 0.0
        if q.dtype == torch.bfloat16 and x.device.type == "cpu":
            # torch's CPU attention kernels are slower in bf16 than in float32 (forward and backward
            # at cpu-10min's shape: 68 vs 49 ms; at d256 / 8 heads: 334 vs 183 ms; 2-core AMD EPYC
            # with avx512_bf16, torch 2.13.0): on CPUs attention runs in float32 under bf16 autocast
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=causal, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)  # exact erf GELU


class SwiGLU(nn.Module):
    """silu(gate(x)) * up(x) -> proj: a gated MLP (Shazeer 2020; Llama). Its three matrices hold
    the parameters of a GELU MLP of width 1.5 x d_mlp, so give it d_mlp ~ 2/3 of a GELU one's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache | RowKVCache] = None, layer: int = 0,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                story_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rope, story_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    # buffers (registered below): declared so that they read as tensors, not as nn.Module's Tensor | Module
    pos_table: Optional[torch.Tensor]
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Not a parameter and not saved: a fixed function of (context_len, d_model). Scaled so its
        # RMS equals the token embeddings' initial std (0.02): at unit amplitude, 35x the tokens,
        # the position swamps the token identity and training stalls near the unigram loss
        # (validation loss after 80 steps at d128: 5.556 against 5.998 nats per token;
        # benchmarks/records/tutorial-differences.json).
        if cfg.positions == "sinusoidal":
            table = POS_SCALE * sinusoidal_table(cfg.context_len, cfg.d_model)
            self.register_buffer("pos_table", table, persistent=False)
        else:  # rotary: nothing is added to the embeddings; q and k are rotated in every layer
            self.pos_table = None
            cos, sin = rope_tables(cfg.context_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # one matrix for both: the input embedding then learns from every output position's
            # gradient instead of only from the tokens present in the batch
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: weights N(0, 0.02), biases zero, LayerNorm weight one, and the
        two projections that write into the residual stream scaled by 1/sqrt(2 * n_layers) so the
        stream's variance does not grow with depth. With zero_init those two start at zero
        instead (each block starts as the identity; the gradients still reach every weight,
        through the projections' inputs), and so does an untied head."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if isinstance(module, nn.LayerNorm) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            for proj in (block.attn.proj, block.mlp.proj):
                if self.cfg.zero_init:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * self.cfg.n_layers))
        if self.cfg.zero_init and not self.cfg.tie_embeddings:
            # zero logits: the first loss is exactly ln(vocab) and the first steps learn the unigram
            # distribution instead of undoing a random head (modded-nanogpt's initialisation)
            nn.init.zeros_(self.lm_head.weight)

    @overload
    def forward(self, idx: torch.Tensor, cache: Optional[KVCache | RowKVCache] = None,
                labels: None = None, stories: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    @overload
    def forward(self, idx: torch.Tensor, cache: Optional[KVCache | RowKVCache] = None, *,
                labels: torch.Tensor, stories: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache | RowKVCache] = None,
                labels: Optional[torch.Tensor] = None,
                stories: Optional[torch.Tensor] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] -> logits [B, T, vocab]. With a cache, idx holds only the new tokens;
        with a RowKVCache, row b continues from its own length (rows 0..B-1 of the cache).

        With `labels` ([B, T], IGNORE_INDEX = no target) it returns (summed loss, real-token count) instead,
        through the fused chunked head + cross-entropy that never holds all the logits.

        `stories` ([B, T], non-decreasing along each row, no cache) numbers the stories packed
        into a row: a token then attends only to earlier tokens of its own story, and absolute
        positions restart at each story's first token, so each story is read as if it began the
        row (rotary attention depends only on distances, so it needs no restart)."""
        B, T = idx.shape
        rows: Optional[torch.Tensor] = None  # [B, T] per-row positions
        if isinstance(cache, RowKVCache):
            rows = cache.positions(B, T)
            start = int(rows[:, 0].max())
        else:
            start = 0 if cache is None else cache.length
        if start + T > self.cfg.context_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.context_len})")
        if stories is not None and cache is not None:
            raise ValueError("stories (a per-story attention mask) is for whole rows, not for a KV cache")
        x = self.wte(idx)
        rope, story_mask = None, None
        if stories is not None:
            same = stories.unsqueeze(2) == stories.unsqueeze(1)  # [B, T, T]
            story_mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()).unsqueeze(1)
        if self.pos_table is not None:
            if rows is not None:
                x = x + self.pos_table[rows]
            elif stories is None:
                x = x + self.pos_table[start:start + T]
            else:
                t = torch.arange(T, device=idx.device).expand(B, T)
                first = torch.ones_like(stories, dtype=torch.bool)
                first[:, 1:] = stories[:, 1:] != stories[:, :-1]
                story_start = torch.where(first, t, torch.zeros_like(t)).cummax(dim=1).values
                x = x + self.pos_table[t - story_start]
        elif rows is not None:  # [B, 1, T, hd]: broadcast over the heads
            rope = (self.rope_cos[rows].unsqueeze(1), self.rope_sin[rows].unsqueeze(1))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = F.dropout(x, self.cfg.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, rope, story_mask)
        if isinstance(cache, RowKVCache):
            cache.lengths[:B] += T
        elif cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if labels is not None:
            loss_sum = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, labels.reshape(-1))
            return loss_sum, (labels != IGNORE_INDEX).sum()
        return self.lm_head(x)

    # ------------------------------------------------------------ saving

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict with each tensor once (a tied head is the embedding, not a copy)."""
        state = self.state_dict()
        if self.cfg.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `weights()`; raises RuntimeError naming missing or unexpected tensors."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")

    # ------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper / nanoGPT:
        6 per weight of every matrix product, plus the attention scores and their use."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul + 12.0 * self.cfg.n_layers * self.cfg.d_model * seq_len


def build_model(cfg: ModelConfig, device: torch.device, bytes_per_param: int = 4) -> Transformer:
    """The model on `device`, or one line saying it cannot fit: its size, and what to lower.
    `bytes_per_param`: what each parameter will cost (4 to hold float32 weights; 16 to train them
    with AdamW), checked against the memory free before anything is allocated."""
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    need, free = bytes_per_param * n, available_memory(device)
    what = (f"the model has {n:,} parameters ({4 * n / 1e9:,.2f} GB of float32 weights"
            + (f", {need / 1e9:,.2f} GB with gradients and optimizer state)" if bytes_per_param > 4 else ")"))
    advice = "lower --d-model, --n-layers or --d-mlp (or use a smaller tokenizer)"
    if free is not None and need > free:
        raise CairnError(f"{what}, more than the {free / 1e9:,.2f} GB free on {device}: {advice}")
    try:
        return Transformer(cfg).to(device)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e).lower():
            raise
        raise CairnError(f"out of memory on {device} building the model: {what}: {advice}") from None
