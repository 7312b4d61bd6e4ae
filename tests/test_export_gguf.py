"""`cairn export --format gguf`: the file read back, and run by a real llama.cpp (node-llama-cpp, installed by
`bash scripts/setup.sh test`), which must tokenize, score and decode as cairn does."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import run_llama_cpp as llama_cpp  # noqa: E402
from conftest import TINYSTORIES, have_tinystories, make_stories  # noqa: E402

from cairn.checkpoint import store as ckpt  # noqa: E402
from cairn.checkpoint.load import load  # noqa: E402
from cairn.cli import main  # noqa: E402
from cairn.config.presets import preset  # noqa: E402
from cairn.export.gguf import export_gguf, modelfile_path, rope_permute  # noqa: E402
from cairn.inference.generate import generate_ids  # noqa: E402
from cairn.inference.sampling import SamplingConfig  # noqa: E402
from cairn.model.transformer import Transformer, apply_rope, rope_tables  # noqa: E402
from cairn.tokenizer.base import get_tokenizer  # noqa: E402
from cairn.version import __version__  # noqa: E402

# a TinyStories story (real text, with the dataset's curly quotes), and text that exercises the
# pre-tokenizer: contractions, digits, runs of spaces and newlines, non-Latin letters, emoji, and
# <|endoftext|> written in a story (ordinary text for cairn, as for llama.cpp without special parsing)
STORY = ("One day, a little girl named Lily found a needle in her room. She knew it was difficult to play with it "
         "because it was sharp. Lily wanted to share the needle with her mom, so she could sew a button on her "
         "shirt. She went to her mom and said, \u201cMom, I found this needle. Can you share it with me?\u201d")
TRICKY = ["They're 3 cats; it's 1999's   best\n\n  day!", "na\u00efve caf\u00e9 \u0421\u0430\u0448\u0430 \u4f60\u597d "
          "\U0001f600  ok", "a <|endoftext|> b", "   leading and trailing   ", "x\ty\r\nz 12345 678"]


def held_out() -> list[str]:
    """Stories no tokenizer here learned from: the sample's last file (the small tokenizer learns on its
    first), else generated ones with another seed; and the real story above."""
    if have_tinystories():
        path = sorted(TINYSTORIES.glob("*.jsonl"))[-1]
        lines = path.read_text(encoding="utf-8").splitlines()
        stories = [json.loads(x)["text"] for x in lines[-6:]]
    else:
        stories = make_stories(6, seed=99)
    return stories + [STORY]


def save_run(run: Path, cfg, model: Transformer, tok) -> Path:
    """A run directory with one final checkpoint, as the training loop writes it."""
    meta = {"kind": "final", "cairn_version": __version__, "config": cfg.to_dict(),
            "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size}}
    return ckpt.save_checkpoint(run / "checkpoints" / f"{cfg.name}_final", model.weights(), meta)


def llama_run(run: Path, tokenizer: str, bias: bool = False, tied: bool = False, seed: int = 0,
              lora_rank: int = 0):
    """A Llama-block run (random weights far from the initialisation, an unusual rope theta) with the
    tokenizer `tokenizer` ("gpt2" or a directory)."""
    tok = get_tokenizer(tokenizer)
    cfg = preset("tiny")
    cfg.tokenizer = tokenizer
    m = cfg.model
    m.vocab_size = tok.vocab_size
    m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "rope", "rmsnorm", "swiglu", bias, tied
    m.context_len, m.rope_theta, m.d_mlp, m.norm_eps = 96, 500.0, 96, 1e-6
    torch.manual_seed(seed)
    model = Transformer(m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.1) + (1.0 if "ln" in name else 0.0))
        model.lm_head.weight.mul_(1.0 if tied else 3.0)  # spread out logits: clearer greedy choices
    if lora_rank:
        from cairn.model import lora

        cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_targets = lora_rank, 8.0, "qkv,gate"
        model = lora.add_adapters(model, lora_rank, 8.0, "qkv,gate")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
    save_run(run, cfg, model, tok)
    return cfg, tok


def read(path: Path) -> tuple[dict, dict]:
    """(metadata values by key, tensors by name) of a GGUF file, through gguf's own reader."""
    r = gguf.GGUFReader(str(path))
    meta = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = f.contents()
    return meta, {t.name: t for t in r.tensors}


def dequantized(t) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


# ---------------------------------------------------------------- the file, read back

def test_rope_permutation_turns_cairns_rotation_into_llama_cpps():
    """llama.cpp's llama graph rotates dims (2i, 2i+1) by position * theta^(-2i/hd); cairn rotates (i, i+hd/2).
    q from the permuted weight, rotated llama.cpp's way, must be cairn's rotated q with its rows permuted."""
    torch.manual_seed(0)
    n_heads, hd, d_in, T, theta = 3, 8, 10, 7, 500.0
    w, b, x = torch.randn(n_heads * hd, d_in), torch.randn(n_heads * hd), torch.randn(T, d_in)
    cos, sin = rope_tables(T, hd, theta)
    ours = apply_rope((x @ w.T + b).view(T, n_heads, hd).transpose(0, 1), cos, sin)  # [H, T, hd]
    q = (x @ rope_permute(w, n_heads).T + rope_permute(b, n_heads)).view(T, n_heads, hd).transpose(0, 1)
    angle = torch.arange(T)[:, None] * theta ** (-torch.arange(0, hd, 2) / hd)  # [T, hd/2]
    even, odd = q[..., 0::2], q[..., 1::2]
    theirs = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1)
    assert torch.allclose(rope_permute(ours.transpose(0, 1).reshape(T, -1).T, n_heads).T,
                          theirs.flatten(-2).transpose(0, 1).reshape(T, -1), atol=1e-5)


@pytest.mark.parametrize("tied,bias", [(True, True), (False, False)])
def test_the_file_holds_the_config_the_tokenizer_and_the_weights(tmp_path, small_tokenizer, tied, bias):
    cfg, tok = llama_run(tmp_path / "run", str(small_tokenizer), bias=bias, tied=tied)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)]) == 0
    meta, tensors = read(out)
    m = cfg.model
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0  # all f32
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"]) == (96, 64, 2, 96, 4, 4, 16)
    assert meta["llama.rope.freq_base"] == 500.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == tok.eot_id
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size == m.vocab_size and tokens[tok.eot_id] == "<|endoftext|>"
    assert types[tok.eot_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == len(tokens) - 1
    assert len(meta["tokenizer.ggml.merges"]) == tok.vocab_size - 257  # 256 bytes + end-of-text need no merge

    model = load(tmp_path / "run", device="cpu").model
    assert ("output.weight" in tensors) is not tied
    assert ("blk.0.attn_q.bias" in tensors) is bias and ("blk.1.ffn_down.bias" in tensors) is bias
    assert np.array_equal(dequantized(tensors["token_embd.weight"]), model.wte.weight.detach().numpy())
    q, k, v = model.blocks[1].attn.qkv.weight.detach().chunk(3)
    assert np.array_equal(dequantized(tensors["blk.1.attn_q.weight"]), rope_permute(q, 4).numpy())
    assert np.array_equal(dequantized(tensors["blk.1.attn_k.weight"]), rope_permute(k, 4).numpy())
    assert np.array_equal(dequantized(tensors["blk.1.attn_v.weight"]), v.numpy())
    gate = model.blocks[0].mlp.gate.weight.detach().numpy()
    assert np.array_equal(dequantized(tensors["blk.0.ffn_gate.weight"]), gate)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())


def test_q8_0_quantizes_matrices_with_ggufs_quantizer_and_keeps_norms_f32(tmp_path, small_tokenizer):
    llama_run(tmp_path / "run", str(small_tokenizer))
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    export_gguf(tmp_path / "run", f32, "f32")
    export_gguf(tmp_path / "run", q8, "q8_0")
    meta, tensors = read(q8)
    _, exact = read(f32)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, t in tensors.items():
        ref = dequantized(exact[name])
        if "norm" in name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(dequantized(t), ref), name
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        # per block of 32: int8 times an f16 scale of max|w| / 127, so half a step off at most, plus 127
        # times the scale's f16 rounding (2^-11 of it)
        blocks = ref.reshape(-1, 32)
        step = np.abs(blocks).max(1, keepdims=True) / 127
        assert np.all(np.abs(dequantized(t).reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2 ** -11)), name
    assert q8.stat().st_size < 0.4 * f32.stat().st_size


def test_q8_0_keeps_rows_that_do_not_split_into_blocks_of_32_in_f16():
    from cairn.export.gguf import _tensor_type

    q = gguf.GGMLQuantizationType
    assert _tensor_type(np.zeros((64, 96), np.float32), "q8_0") == q.Q8_0
    assert _tensor_type(np.zeros((64, 80), np.float32), "q8_0") == q.F16  # as llama.cpp's converter falls back
    assert _tensor_type(np.zeros(96, np.float32), "q8_0") == q.F32


def test_f16_and_bf16_store_matrices_in_half_precision(tmp_path, small_tokenizer):
    llama_run(tmp_path / "run", str(small_tokenizer))
    for kind, ggml in (("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)):
        export_gguf(tmp_path / "run", tmp_path / f"{kind}.gguf", kind)
        _, tensors = read(tmp_path / f"{kind}.gguf")
        assert {t.tensor_type for n, t in tensors.items() if "norm" not in n} == {ggml}
        emb = load(tmp_path / "run", device="cpu").model.wte.weight.detach().numpy()
        assert np.abs(dequantized(tensors["token_embd.weight"]) - emb).max() <= np.abs(emb).max() * 2 ** -8


def test_the_ollama_modelfile_carries_cairns_sampling_defaults(tmp_path, small_tokenizer):
    llama_run(tmp_path / "run", str(small_tokenizer))
    out = export_gguf(tmp_path / "run", tmp_path / "story.gguf")
    lines = modelfile_path(out).read_text().splitlines()
    assert modelfile_path(out).name == "story.Modelfile" and lines[0] == "FROM ./story.gguf"
    params = {ln.split(" ", 2)[1]: ln.split(" ", 2)[2] for ln in lines if ln.startswith("PARAMETER ")}
    s = SamplingConfig()
    assert params["stop"] == '"<|endoftext|>"' and params["num_ctx"] == "96"
    assert (float(params["temperature"]), int(params["top_k"]), float(params["top_p"]),
            float(params["repeat_penalty"]), int(params["num_predict"]), int(params["seed"])) == \
        (s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.max_new_tokens, s.seed)


@pytest.mark.slow  # peft's import
def test_a_lora_run_exports_its_merged_weights(tmp_path, small_tokenizer):
    llama_run(tmp_path / "run", str(small_tokenizer), lora_rank=4)
    out = export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    _, tensors = read(out)
    assert not [n for n in tensors if "lora" in n]
    merged = load(tmp_path / "run", device="cpu", merge=True).model
    base_q = load(tmp_path / "run", device="cpu").model.blocks[0].attn.qkv.base_layer.weight.detach().chunk(3)[0]
    q = merged.blocks[0].attn.qkv.weight.detach().chunk(3)[0]
    assert not torch.allclose(q, base_q)  # the adapters changed q: the file must hold the merged one
    assert np.allclose(dequantized(tensors["blk.0.attn_q.weight"]), rope_permute(q, 4).numpy(), atol=1e-6)
    gate = merged.blocks[1].mlp.gate.weight.detach().numpy()
    assert np.allclose(dequantized(tensors["blk.1.ffn_gate.weight"]), gate, atol=1e-6)


def test_bad_exports_are_refused_in_one_line_writing_nothing(tmp_path, small_tokenizer, capsys):
    tok = get_tokenizer(str(small_tokenizer))
    cfg = preset("tiny")  # GPT-2's block
    cfg.tokenizer, cfg.model.vocab_size = str(small_tokenizer), tok.vocab_size
    save_run(tmp_path / "gpt2", cfg, Transformer(cfg.model), tok)
    llama_run(tmp_path / "llama", str(small_tokenizer))
    (tmp_path / "taken.gguf").write_bytes(b"")
    cases = [
        (["export", str(tmp_path / "gpt2"), "--format", "gguf", "--out", str(tmp_path / "a.gguf")], "GELU"),
        (["export", str(tmp_path / "llama"), "--format", "gguf", "--out", str(tmp_path / "taken.gguf")],
         "already exists"),
        (["export", str(tmp_path / "llama"), "--format", "gguf", "--out", str(tmp_path / "b.bin")], ".gguf"),
        (["export", str(tmp_path / "llama"), "--format", "gguf", "--out", str(tmp_path / "no" / "c.gguf")],
         "does not exist"),
        (["export", str(tmp_path / "llama"), "--gguf-type", "q8_0", "--out", str(tmp_path / "hf")], "--format gguf"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "gguf", None)  # not installed
        assert main(["export", str(tmp_path / "llama"), "--format", "gguf", "--out", str(tmp_path / "d.gguf")]) == 2
        assert "pip install" in capsys.readouterr().err
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "llama", "taken.gguf"]
    assert (tmp_path / "taken.gguf").read_bytes() == b""


def test_the_docs_quote_the_gguf_record():
    from cairn.bench.record import read_result

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "use-elsewhere.md").read_text(encoding="utf-8")
    r = read_result(repo / "benchmarks" / "records" / "gguf-cpu-10min.json")
    assert f"scores {r['cairn_bits_per_byte']:.6f} bits per" in text
    for kind, f in r["files"].items():
        assert (f"| {kind} | {f['bytes'] / 1e6:.2f} MB | {'yes' if f['token_ids_equal'] else 'no'} | "
                f"{f['max_abs_logprob_diff']:.1e} | {f['same_argmax_frac']:.2%} | "
                f"{f['greedy50_equal']} of {f['greedy50_prompts']} | {f['bits_per_byte']:.6f} |") in text, kind


# ---------------------------------------------------------------- a real llama.cpp runs it

def cairn_logprobs(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1).numpy()


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    s = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False)
    return list(generate_ids(model, prompt, s))


@pytest.fixture(scope="module")
def llama_cpp_runs(tmp_path_factory, small_tokenizer):
    """Four files run by llama.cpp in one node process: the cpu-10min shape (untied, no biases) with an own
    BPE at f32 and q8_0; biases and a tied head at f32; GPT-2's tokenizer (50,257 tokens) at q8_0 (tokens
    and greedy text only: node-llama-cpp hands over each position's 50,257 probabilities slowly)."""
    why = llama_cpp.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"llama.cpp must run in CI: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("gguf-llama-cpp")
    llama_run(root / "plain", str(small_tokenizer), seed=1)
    llama_run(root / "biased", str(small_tokenizer), bias=True, tied=True, seed=2)
    llama_run(root / "gpt2", "gpt2", tied=True, seed=3)
    files = {"f32": export_gguf(root / "plain", root / "plain-f32.gguf", "f32"),
             "q8_0": export_gguf(root / "plain", root / "plain-q8_0.gguf", "q8_0"),
             "biased": export_gguf(root / "biased", root / "biased-f32.gguf", "f32"),
             "gpt2": export_gguf(root / "gpt2", root / "gpt2-q8_0.gguf", "q8_0")}
    runs = {"f32": root / "plain", "q8_0": root / "plain", "biased": root / "biased", "gpt2": root / "gpt2"}
    texts = held_out()
    jobs, loaded = [], {}
    for name, path in files.items():
        loaded[name] = load(runs[name], device="cpu")
        tok = loaded[name].tokenizer
        seqs = [[tok.eot_id] + tok.encode(t)[:60] for t in texts[-3:]]
        seqs.append(([tok.eot_id] + tok.encode(" ".join(texts)))[:96])  # the whole context
        job = {"model": str(path), "kv": "F32", "tokenize": texts + TRICKY, "score": seqs,
               "greedy": [{"prompt": s[:8], "n": 50} for s in seqs[:2]]}
        if name == "gpt2":
            del job["score"]
        jobs.append(job)
    answers = llama_cpp.run(jobs)
    return {name: (loaded[name], job, answer) for name, job, answer in zip(files, jobs, answers)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["f32", "biased", "gpt2"])
def test_llama_cpp_tokenizes_as_cairn(llama_cpp_runs, name):
    loaded, job, answer = llama_cpp_runs[name]
    assert answer["tokens"] == [loaded.tokenizer.encode(t) for t in job["tokenize"]]
    # llama.cpp reads a BPE whose bos and eos are <|endoftext|>, put before a prompt and ending generation
    eot = loaded.tokenizer.eot_id
    assert (answer["vocabularyType"], answer["bos"], answer["eos"], answer["bosString"]) == ("bpe", eot, eot,
                                                                                             "<|endoftext|>")
    assert answer["prependsBos"] is True and answer["appendsEos"] is False
    assert answer["endOfGeneration"] == [True, True]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["f32", "biased"])
def test_llama_cpp_computes_cairns_logits_and_greedy_text_at_f32(llama_cpp_runs, name):
    loaded, job, answer = llama_cpp_runs[name]
    assert answer["kv"] == [0, 0]  # GGML_TYPE_F32 keys and values
    for ids, theirs in zip(job["score"], answer["logprobs"]):
        ours = cairn_logprobs(loaded.model, ids)
        # log-softmax of the logits at every position: float32 round-off (2e-6 to 1.1e-5 measured, 2-core
        # AMD EPYC); a wrong rotary order, theta or eps is off by 1e-2 to whole units
        print(f"{name}: max |log p diff| {np.abs(theirs - ours).max():.2e}")
        assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1e-4
    for g, theirs in zip(job["greedy"], answer["greedy"]):
        assert theirs == greedy(loaded.model, g["prompt"], 50)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q8_0", "gpt2"])
def test_llama_cpp_runs_q8_0_close_to_cairn(llama_cpp_runs, name):
    """q8_0 is not exact: its next-token distributions stay close to cairn's, and every token of its greedy
    text is one cairn's float32 model ranks first or nearly first after the same text."""
    loaded, job, answer = llama_cpp_runs[name]
    if "score" in job:
        for ids, theirs in zip(job["score"], answer["logprobs"]):
            ours = cairn_logprobs(loaded.model, ids)
            # |p - q| summed over the vocabulary (twice the total variation) at every position: up to 0.11
            # measured, 0.05 on average, and the same argmax at 90 to 97% of positions; a file computing
            # another function (say, rotary pairs unpermuted) is off by whole nats
            tv2 = np.abs(np.exp(theirs) - np.exp(ours)).sum(-1)
            agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
            print(f"q8_0: |p - q|_1 max {tv2.max():.3f} mean {tv2.mean():.3f}, same argmax {agree:.2f}")
            assert tv2.max() <= 0.2 and agree >= 0.8
    for g, theirs in zip(job["greedy"], answer["greedy"]):
        assert len(theirs) == 50
        ours = cairn_logprobs(loaded.model, g["prompt"] + theirs)[len(g["prompt"]) - 1:-1]
        # each token llama.cpp picked is cairn's first choice or within 0.25 nats of it (0.125 at most measured)
        gap = ours.max(-1) - ours[np.arange(50), theirs]
        print(f"{name}: greedy tokens cairn ranks first {np.mean(gap == 0):.2f}, largest gap {gap.max():.3f} nats")
        assert gap.max() <= 0.25
