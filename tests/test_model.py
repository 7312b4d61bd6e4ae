import math

import pytest
import torch

from cairn.config.sections import ModelConfig
from cairn.model.transformer import KVCache, RowKVCache, Transformer, apply_rope, rope_tables, sinusoidal_table
from cairn.config.presets import preset
from reference import lm_loss

# the tutorial's block, the Llama block, and a mix: every switch combination must stay causal,
# length-independent and cache-exact
BLOCKS = {
    "tutorial": {},
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True),
    "rope+layernorm+gelu": dict(positions="rope"),
}
blocks = pytest.mark.parametrize("block", BLOCKS.values(), ids=BLOCKS.keys())


def small(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_mlp=64, context_len=40, **kw)
    torch.manual_seed(0)
    return Transformer(cfg)


@pytest.mark.slow
def test_reference_model_has_the_tutorials_parameter_count():
    model = Transformer(preset("reference-105m").model)
    assert model.num_params() == 105_547_776


@blocks
def test_causal_changing_future_tokens_leaves_past_logits_unchanged(block):
    model = small(**block).eval()
    x = torch.randint(0, 97, (2, 30))
    t = 12
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 97, (2, 30 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # and the future does change


@blocks
def test_positions_work_at_any_length_not_only_the_context(block):
    model = small(**block).eval()
    x = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(x)
        short = model(x[:, :7])
    torch.testing.assert_close(full[:, :7], short, rtol=0, atol=1e-5)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3  # dims 2i and 2i+1
    angle = pos / (10000 ** (2 * i / 16))
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rotary_scores_depend_only_on_the_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(64, 16, 10000.0)

    def score(m: int, n: int) -> float:
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum().item()

    assert score(10, 3) == pytest.approx(score(47, 40), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
    # a rotation: norms are kept
    assert apply_rope(q, cos[33:34], sin[33:34]).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


@blocks
def test_padding_never_changes_the_loss(block):
    model = small(**block).eval()
    story = torch.randint(0, 96, (1, 15))
    labels = torch.roll(story, -1, 1)
    labels[0, -1] = 96
    with torch.no_grad():
        alone, n_alone = lm_loss(model(story), labels)
        for pad_len, pad_id in ((5, 0), (20, 96), (9, 3)):
            padded = torch.cat([story, torch.full((1, pad_len), pad_id)], 1)
            padded_labels = torch.cat([labels, torch.full((1, pad_len), -100)], 1)
            s, n = lm_loss(model(padded), padded_labels)
            assert n == n_alone == 15
            assert s.item() == pytest.approx(alone.item(), rel=1e-5)
            # what stands in the padding does not matter either
            junk = padded.clone()
            junk[0, 15:] = torch.randint(0, 97, (pad_len,))
            s2, _ = lm_loss(model(junk), padded_labels)
            assert s2.item() == pytest.approx(alone.item(), rel=1e-5)


@blocks
def test_kv_cache_decoding_equals_full_recomputation(block):
    model = small(**block).eval()
    x = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, "cpu", torch.float32)
        parts = [model(x[:, :10], cache)]  # prefill
        parts += [model(x[:, i:i + 1], cache) for i in range(10, 20)]  # one token at a time
        parts.append(model(x[:, 20:], cache))  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


@blocks
def test_rows_at_different_lengths_decode_in_one_batch_as_each_alone(block):
    """A RowKVCache: three sequences with prompts of 3, 11 and 7 tokens, each prefilled into its own
    row, then decoded together, one token per row per step; every row's logits are those of the
    sequence run alone (a full forward over its tokens). A finished row's place is taken by another."""
    model = small(**block).eval()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (n,)) for n in (3 + 8, 11 + 8, 7 + 8)]
    prompts = [3, 11, 7]
    with torch.no_grad():
        alone = [model(s[None])[0] for s in seqs]
        cache = RowKVCache(model.cfg, 4, "cpu", torch.float32)
        for i, (s, n) in enumerate(zip(seqs, prompts)):
            view = cache.row(i)
            got = model(s[None, :n], view)[0]
            cache.lengths[i] = view.length
            torch.testing.assert_close(got, alone[i][:n], rtol=0, atol=1e-5)
        for step in range(8):
            if step == 5:  # the second sequence is done: the third moves into its row
                cache.move(2, 1)
                seqs, prompts, alone = [seqs[0], seqs[2]], [prompts[0], prompts[2]], [alone[0], alone[2]]
            idx = torch.stack([s[n + step] for s, n in zip(seqs, prompts)])[:, None]
            logits = model(idx, cache)
            for b, (n, ref) in enumerate(zip(prompts, alone)):
                torch.testing.assert_close(logits[b, 0], ref[n + step], rtol=0, atol=1e-5)
    assert cache.lengths[:2].tolist() == [3 + 8, 7 + 8]


def test_longer_than_context_is_refused():
    model = small()
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_gpt2_initialisation():
    model = Transformer(ModelConfig(vocab_size=1000, d_model=256, n_layers=8, n_heads=8, d_mlp=1024, context_len=64))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0


def test_zero_init_starts_every_block_as_the_identity_and_still_trains_every_weight():
    model = small(zero_init=True, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    x = torch.randint(0, 97, (2, 16))
    # zero branch outputs and a zero head: uniform logits, a loss of exactly ln(vocab)
    assert torch.equal(model(x), torch.zeros(2, 16, 97))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the rest as GPT-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(3):  # the head moves first, then the projections, then what feeds them
        s, n = lm_loss(model(x), torch.roll(x, -1, 1))
        opt.zero_grad()
        (s / n).backward()
        opt.step()
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    # a tied head is the embedding: it keeps its random start
    tied = small(zero_init=True, tie_embeddings=True)
    assert tied.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert tied.blocks[1].mlp.proj.weight.abs().max().item() == 0


def test_a_small_model_overfits_one_batch():
    model = small()
    torch.manual_seed(1)
    x = torch.randint(0, 97, (4, 32))
    y = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        s, n = lm_loss(model(x), y)
        loss = s / n
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.1


def test_tied_embeddings_share_one_matrix_and_save_it_once():
    tied = small(tie_embeddings=True)
    untied = small()
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    w = tied.weights()
    assert "lm_head.weight" not in w and "wte.weight" in w
    other = small(tie_embeddings=True)
    other.load_weights({k: v.clone() for k, v in w.items()})
    assert other.lm_head.weight is other.wte.weight
    assert torch.equal(other.lm_head.weight, tied.wte.weight)
    with pytest.raises(RuntimeError, match="missing"):
        untied.load_weights(w)  # an untied model needs its own head


@blocks
def test_story_mask_reads_each_packed_story_as_if_it_began_the_row(block):
    """A row packing the tail of one story and two whole ones (each from its <|endoftext|>):
    with `stories`, each story's logits are those of the story alone, at the start of a row, for
    absolute and rotary positions alike; without, the later stories see the earlier ones."""
    model = small(**block).eval()
    eot = 96
    g = torch.Generator().manual_seed(1)
    tail, s1, s2 = (torch.randint(0, 96, (n,), generator=g) for n in (5, 9, 12))
    row = torch.cat([tail, torch.tensor([eot]), s1, torch.tensor([eot]), s2]).unsqueeze(0)
    stories = (row == eot).cumsum(1)
    with torch.no_grad():
        packed = model(row, stories=stories)
        unmasked = model(row)
        alone = [model(seg.unsqueeze(0)) for seg in (tail, torch.cat([torch.tensor([eot]), s1]),
                                                     torch.cat([torch.tensor([eot]), s2]))]
    pieces = torch.split(packed, [5, 10, 13], dim=1)
    for got, want in zip(pieces, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, 15:] - packed[:, 15:]).abs().max() > 1e-3


def test_story_mask_loss_is_the_sum_of_the_stories_losses():
    model = small(**BLOCKS["llama"]).eval()
    eot = 96
    g = torch.Generator().manual_seed(2)
    s1, s2 = torch.randint(0, 96, (7,), generator=g), torch.randint(0, 96, (10,), generator=g)
    stream = torch.cat([torch.tensor([eot]), s1, torch.tensor([eot]), s2, torch.tensor([eot])])
    x, y = stream[:-1].unsqueeze(0), stream[1:].unsqueeze(0)
    with torch.no_grad():
        packed, n = model(x, labels=y, stories=(x == eot).cumsum(1))
        first, _ = model(x[:, :8], labels=y[:, :8])
        second, _ = model(x[:, 8:], labels=y[:, 8:])
    assert int(n) == 19
    torch.testing.assert_close(packed, first + second, rtol=1e-5, atol=1e-5)


def test_story_mask_is_refused_with_a_kv_cache():
    model = small(**BLOCKS["llama"]).eval()
    x = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="stories"):
        model(x, cache=KVCache(model.cfg, 1, "cpu", torch.float32), stories=torch.zeros_like(x))


def test_training_with_story_mask_numbers_the_stories_from_each_eot(tmp_path, stories_file, small_tokenizer,
                                                                     monkeypatch):
    from cairn.config.io import apply_overrides
    from cairn.tokenizer.base import get_tokenizer
    from cairn.training import train

    seen = []
    forward = Transformer.forward

    def recording(self, idx, cache=None, labels=None, stories=None):
        if self.training:  # training steps (evaluation reads each story alone, unmasked)
            seen.append((idx.clone(), None if stories is None else stories.clone()))
        return forward(self, idx, cache, labels, stories)

    monkeypatch.setattr(Transformer, "forward", recording)
    cfg = apply_overrides(preset("tiny"), {
        "source": str(stories_file), "tokenizer": str(small_tokenizer), "d_model": 32, "n_heads": 4, "n_layers": 1,
        "d_mlp": 64, "context_len": 64, "seq_len": 64, "batch_size": 4, "max_steps": 2, "story_mask": True,
        "end_stories": 0, "eval_every": 0})
    train(cfg, tmp_path / "run")
    eot_id = get_tokenizer(str(small_tokenizer)).eot_id
    assert len(seen) >= 2
    for idx, stories in seen:
        eot = idx == eot_id
        assert stories is not None and torch.equal(stories, eot.cumsum(1))
    assert any(bool(eot.any()) for idx, _ in seen for eot in [idx == eot_id])  # rows that pack several stories
