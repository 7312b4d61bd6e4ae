import torch

from cairn.config.sections import ModelConfig
from cairn.inference.generate import SamplingConfig, filter_logits, generate_ids
from cairn.model.transformer import Transformer


def model(context_len=32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_mlp=64,
                                   context_len=context_len)).eval()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = model()
    s = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7, stop_at_eot=False)
    a = list(generate_ids(m, [1, 2, 3], s))
    b = list(generate_ids(m, [1, 2, 3], s))
    c = list(generate_ids(m, [1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8, stop_at_eot=False)))
    assert a == b and a != c


def test_cached_and_uncached_generation_agree_past_the_context():
    m = model(context_len=16)
    s = SamplingConfig(max_new_tokens=30, temperature=0, stop_at_eot=False)
    prompt = list(range(1, 11))
    assert list(generate_ids(m, prompt, s, use_cache=True)) == list(generate_ids(m, prompt, s, use_cache=False))


def test_greedy_picks_the_argmax():
    m = model()
    out = list(generate_ids(m, [5, 6], SamplingConfig(max_new_tokens=1, temperature=0, stop_at_eot=False)))
    with torch.no_grad():
        assert out[0] == int(m(torch.tensor([[5, 6]]))[0, -1].argmax())


def test_prompt_longer_than_context_keeps_its_end():
    m = model(context_len=16)
    s = SamplingConfig(max_new_tokens=3, temperature=0, stop_at_eot=False)
    long_prompt = list(range(40))
    assert list(generate_ids(m, long_prompt, s)) == list(generate_ids(m, long_prompt[-16:], s))


def test_stops_at_end_of_text():
    m = model()
    greedy = SamplingConfig(max_new_tokens=5, temperature=0, stop_at_eot=False)
    first = list(generate_ids(m, [3, 4], greedy))[0]
    # declare the token it would emit first to be the end of text: nothing is produced
    assert list(generate_ids(m, [3, 4], SamplingConfig(max_new_tokens=5, temperature=0), eot_id=first)) == []


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.4)  # the most likely token alone
    assert torch.isfinite(p).tolist() == [[True, False, False, False]]
    m = model()
    s = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=3, stop_at_eot=False)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, stop_at_eot=False)
    assert list(generate_ids(m, [1], s)) == list(generate_ids(m, [1], greedy))


# ---------------------------------------------------------------- streaming text, stop strings, the command

def _stream_of(monkeypatch, tokenizer, ids, stop=(), max_new_tokens=50):
    """A TextStream whose model writes exactly `ids`."""
    import cairn.inference.generate as gen

    def scripted(model, prompt, s, eot_id=None, use_cache=True):
        yield from ids[:s.max_new_tokens]
    monkeypatch.setattr(gen, "generate_ids", scripted)
    return gen.TextStream(None, tokenizer, "Once", SamplingConfig(max_new_tokens=max_new_tokens), stop=stop)


def _byte_tokens(tokenizer, text):
    """`text` as one token per byte: every multi-byte character split across tokens."""
    table = {tokenizer.decode_bytes([i]): i for i in range(tokenizer.vocab_size)
             if len(tokenizer.decode_bytes([i])) == 1}
    return [table[bytes([b])] for b in text.encode("utf-8")]


def test_a_stream_never_breaks_a_character_and_adds_up_to_the_text(monkeypatch, small_tokenizer):
    from cairn.tokenizer.base import get_tokenizer

    tok = get_tokenizer(str(small_tokenizer))
    ids = _byte_tokens(tok, "Café ☕ and a 🐉 dragon.")
    stream = _stream_of(monkeypatch, tok, ids)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == "Café ☕ and a 🐉 dragon."
    assert not any("\ufffd" in p for p in pieces) and len(pieces) < len(ids)  # waited inside each character
    assert stream.tokens == len(ids) and stream.finish_reason == "eot"
    cut = _stream_of(monkeypatch, tok, ids, max_new_tokens=8)
    assert "".join(cut) == cut.text and cut.finish_reason == "length" and cut.tokens == 8


def test_a_stop_string_ends_the_sample_and_is_never_handed_out(monkeypatch, small_tokenizer):
    from cairn.tokenizer.base import get_tokenizer

    tok = get_tokenizer(str(small_tokenizer))
    ids = _byte_tokens(tok, "Tom ran. The end. Then more")
    stream = _stream_of(monkeypatch, tok, ids, stop=["The end", "never"])
    pieces = list(stream)
    assert "".join(pieces) == stream.text == "Tom ran. "
    assert stream.finish_reason == "stop" and stream.tokens == len("Tom ran. The end")
    # a stop string's beginning that never completes is handed out in the end
    partial = _stream_of(monkeypatch, tok, _byte_tokens(tok, "Tom ran. The"), stop=["The end"])
    assert "".join(partial) == "Tom ran. The" and partial.finish_reason == "eot"


def test_the_repetition_penalty_makes_seen_tokens_less_likely():
    from cairn.inference.generate import penalize_repeats

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = penalize_repeats(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]] and logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]
    m = model()
    s = SamplingConfig(max_new_tokens=20, temperature=0, stop_at_eot=False)
    plain = list(generate_ids(m, [1, 2], s))
    strict = list(generate_ids(m, [1, 2], SamplingConfig(max_new_tokens=20, temperature=0, stop_at_eot=False,
                                                         repetition_penalty=1e6)))
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself...
    assert len(set(strict)) == len(strict) and not {1, 2} & set(strict)  # ... and cannot under a huge penalty


def test_generate_json_for_a_prompt_file_and_several_samples(trained_run, tmp_path, capsys):
    import json

    from cairn.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n\n{"prompt": "Tom had a ball"}\n', encoding="utf-8")
    assert main(["generate", str(trained_run.run), "--prompt-file", str(prompts), "--num-samples", "2",
                 "--max-new-tokens", "12", "--temperature", "1.0", "--stop", "zzz", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in out] == [("Once upon a time", 1234), ("Once upon a time", 1235),
                                                      ("Tom had a ball", 1234), ("Tom had a ball", 1235)]
    assert all(1 <= r["tokens"] <= 12 and r["finish_reason"] in ("eot", "length") and r["tokens_per_s"] > 0
               for r in out)
    assert out[0]["text"] != out[1]["text"]  # other seeds, other samples
    assert all((r["finish_reason"] == "length") == (r["tokens"] == 12) for r in out)


def test_generate_streams_by_default_and_prints_whole_samples_with_no_stream(trained_run, capsys):
    from cairn.cli import main

    args = ["generate", str(trained_run.run), "--prompt", "Once upon a time", "--max-new-tokens", "10", "--seed", "3"]
    assert main(args) == 0
    streamed = capsys.readouterr()
    assert main(args + ["--no-stream"]) == 0
    whole = capsys.readouterr()
    assert streamed.out == whole.out and streamed.out.startswith("Once upon a time")
    assert "finish: " in streamed.err and "tokens/s" in streamed.err


def test_bad_prompt_files_are_one_line_errors(trained_run, tmp_path, capsys):
    from cairn.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    for path, expect in ((bad, "bad.jsonl:2: no text field 'prompt'"), (empty, "holds no prompt"),
                         (tmp_path / "nope.txt", "does not exist")):
        assert main(["generate", str(trained_run.run), "--prompt-file", str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and expect in err[0], err
