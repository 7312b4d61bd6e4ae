"""Fine-tuning: --init-from, instruction (sft) data with the loss on answers only, the chat template,
LoRA through peft (exact resume, merged export), and their bad inputs."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cairn.tokenizer.chat_template import ChatTemplate, encode_conversation, instruction, render  # noqa: E402
from cairn.cli import main  # noqa: E402
from cairn.config.sections import validate  # noqa: E402
from cairn.data.formats.sft import SFTRows, prepare_sft  # noqa: E402
from cairn.checkpoint.load import load  # noqa: E402
from cairn.model.ops import IGNORE_INDEX  # noqa: E402
from cairn.tokenizer.base import get_tokenizer  # noqa: E402
from cairn.training import train  # noqa: E402
from helpers import assert_same_weights, config, final_weights  # noqa: E402

THINGS = ["cat", "dog", "ball", "tree", "cake", "kite", "boat", "hat"]


def sft_records(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(THINGS, 2)
        out.append({"prompt": f"Use {a} and {b}.", "response": f"Tom saw a {a}. Then a {b} came."})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_tokenizer):
    """A tiny trained run to start from (d32, 2 layers, the small tokenizer)."""
    from conftest import make_stories, write_stories

    root = tmp_path_factory.mktemp("base")
    data = write_stories(root / "stories.jsonl", make_stories(120))
    cfg = config(data, tokenizer=small_tokenizer, max_steps=6, epochs=1, end_stories=0, num_threads=1,
                 context_len=128)
    train(validate(cfg), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", sft_records(80))


def sft_args(base_run, data, out, *extra) -> list[str]:
    return ["train", "--preset", "tiny", "--init-from", str(base_run), "--format", "sft", "--story-mask",
            "--data", str(data), "--out", str(out), "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3",
            "--eval-every", "0", "--checkpoint-every", "2", "--end-stories", "1", "--end-story-tokens", "8",
            "--num-threads", "1", "--no-progress", *extra]


# ---------------------------------------------------------------- --init-from

def test_init_from_starts_from_the_base_weights_with_its_model_and_tokenizer(base_run, tmp_path, stories_file):
    from cairn.training.build import build_trainer
    from cairn.training.distributed import session
    from cairn.training.init_from import apply

    cfg = config(stories_file, init_from=str(base_run), d_model=64, max_steps=2, num_threads=1)
    cfg = validate(apply(cfg, given=["init-from"]))  # a preset's d_model gives way to the base's
    with session(cfg.system) as dist:
        trainer = build_trainer(cfg, tmp_path / "run", dist)
    assert trainer.state.step == 0 and cfg.model.d_model == 32
    assert_same_weights(trainer.model.weights(), final_weights(base_run))
    assert trainer.tokenizer.name == get_tokenizer(str(base_run / "tokenizer")).name
    assert json.loads((tmp_path / "run" / "run.json").read_text())["init_from"] == cfg.init_from
    assert cfg.init_from.endswith("_final")


def test_cairn_train_from_python_with_init_from_trains_as_the_cli_does(base_run, tmp_path, stories_file):
    """`cairn.train(cfg)` resolves `init_from` as the command line does: a preset's own model settings
    give way to the base's (no "model config differs"), and the run is the CLI's, weight for weight."""
    import cairn
    from cairn.config.presets import preset

    options = {"seq_len": 32, "batch_size": 4, "max_steps": 3, "checkpoint_every": 0, "eval_every": 0,
               "end_stories": 0, "num_threads": 1}
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["train", "--preset", "tiny", "--init-from", str(base_run), "--data", str(stories_file),
                 "--out", str(tmp_path / "cli"), "--no-progress", *flags]) == 0
    cfg = preset("tiny")  # d_model 64: the base's 32 must win, as on the command line
    cfg.init_from, cfg.data.source = str(base_run), str(stories_file)
    cfg.data.seq_len, cfg.train.batch_size, cfg.train.max_steps = 32, 4, 3
    cfg.checkpoint.checkpoint_every, cfg.eval.eval_every, cfg.eval.end_stories, cfg.system.num_threads = 0, 0, 0, 1
    done = cairn.train(cfg, tmp_path / "python")
    assert done["step"] == 3 and cfg.model.d_model == 64  # the caller's config is left as it was
    assert_same_weights(final_weights(tmp_path / "python"), final_weights(tmp_path / "cli"))


def test_an_init_from_run_trains_resumes_evaluates_generates_and_exports(base_run, tmp_path, stories_file, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--init-from", str(base_run), "--data", str(stories_file), "--out", str(run),
            "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "0",
            "--end-stories", "0", "--num-threads", "1", "--no-progress"]
    assert main([*args, "--stop-after", "2"]) == 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    assert main(["generate", str(run), "--prompt", "Tom", "--max-new-tokens", "4", "--json"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["init_from"].startswith(str(base_run.resolve()))


@pytest.mark.parametrize("flag, value, words", [
    ("--d-model", "48", ["--d-model 48", "d_model = 32"]),
    ("--n-layers", "3", ["--n-layers 3", "n_layers = 2"]),
    ("--tokenizer", "gpt2", ["--tokenizer 'gpt2'", "differs"]),
])
def test_a_setting_that_conflicts_with_the_base_is_refused(base_run, tmp_path, stories_file, capsys, flag, value,
                                                           words):
    code = main(["train", "--preset", "tiny", "--init-from", str(base_run), "--data", str(stories_file),
                 "--out", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_init_from_a_path_that_is_not_a_run_is_refused(tmp_path, stories_file, capsys):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        code = main(["train", "--init-from", str(bad), "--data", str(stories_file), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and "--init-from" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the chat template

def test_the_template_renders_and_tokenizes_as_its_pieces(small_tokenizer):
    tok = get_tokenizer(str(small_tokenizer))
    t = ChatTemplate(user="Q: {content}\n", assistant="A: {content}", separator="\n")
    msgs = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Go on."}, {"role": "assistant", "content": "The end."}]
    assert render(t, msgs) == "Q: Hi there.\nA: Hello.\nQ: Go on.\nA: The end."
    ids, target = encode_conversation(t, tok, msgs)
    assert ids[0] == ids[-1] == tok.eot_id and target[-1] and not target[0]
    # the answers (and what ends them) are exactly the target tokens; everything else is prompt
    answers = tok.decode([i for i, t_ in zip(ids, target) if t_ and i != tok.eot_id])
    assert answers == "Hello.\nThe end."
    assert tok.decode(ids[1:-1]) == render(t, msgs)
    # asking for the next answer gives exactly the tokens training saw before that answer
    ask = instruction(t, tok, "Go on.", history=msgs[:2])
    assert ids[:len(ask)] == ask and tok.decode(ask[1:]) == "Q: Hi there.\nA: Hello.\nQ: Go on.\nA: "


def test_the_template_is_saved_in_the_run_and_used_by_its_prompts(base_run, sft_file, tmp_path):
    run = tmp_path / "run"
    code = main(sft_args(base_run, sft_file, run, "--max-steps", "2", "--template-user", "Q: {content}\n",
                         "--template-assistant", "A: {content}"))
    assert code == 0
    loaded = load(run)
    t = ChatTemplate.from_config(loaded.config.chat)
    assert (t.user, t.assistant) == ("Q: {content}\n", "A: {content}")
    assert "Q: Use " in (run / "stories.md").read_text() and "\nA:" in (run / "stories.md").read_text()


# ---------------------------------------------------------------- the loss on answers only

def test_prompt_masked_packed_loss_equals_a_direct_computation(base_run, sft_file, small_tokenizer):
    """The packed rows' summed loss (story mask on) equals, example by example, the cross-entropy of
    the answer tokens and the final <|endoftext|> computed on each example alone."""
    loaded = load(base_run, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    cfg = config(sft_file, tokenizer=small_tokenizer, format="sft", story_mask=True, seq_len=128)
    data = prepare_sft(cfg.data, cfg.chat, cfg.seed, tok)
    rows = SFTRows(data.train, 128, pack=True)
    assert len(rows) < len(data.train.examples)  # several examples share a row
    ours, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            item = rows[i]
            x, y = item["input_ids"][None], item["labels"][None]
            s, n = model(x, labels=y, stories=(x == tok.eot_id).cumsum(1))
            ours, count = ours + float(s), count + int(n)
        direct, direct_count = 0.0, 0
        for conv in data.train.conversations:
            prompt = [tok.eot_id] + tok.encode(f"User: {conv[0]['content']}\nAssistant: ")
            answer = tok.encode(conv[1]["content"]) + [tok.eot_id]
            logits = model(torch.tensor([prompt + answer]))[0]
            scored = logits[len(prompt) - 1:-1]
            direct += float(F.cross_entropy(scored, torch.tensor(answer), reduction="sum"))
            direct_count += len(answer)
    assert count == direct_count
    assert abs(ours - direct) <= 1e-3 * direct


def test_held_out_examples_are_scored_on_their_answers(base_run, sft_file, tmp_path):
    run = tmp_path / "run"
    assert main(sft_args(base_run, sft_file, run, "--max-steps", "2")) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r][-1]
    test = [r for r in recs if r.get("kind") == "test"][-1]
    answers = json.loads((run / "run.json").read_text())["data"]["splits"]
    # targets: every answer token, the <|endoftext|> after it included
    assert test["test_tokens"] == answers["test"]["answer_tokens"]
    assert val["val_bits_per_byte"] > 0 and val["val_perplexity"] > 1


# ---------------------------------------------------------------- LoRA

@pytest.mark.slow
def test_lora_trains_only_adapters_and_resumes_exactly(base_run, sft_file, tmp_path, logs):
    whole, split = tmp_path / "whole", tmp_path / "split"
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "4", "--end-stories", "0"]
    assert main(sft_args(base_run, sft_file, whole, *lora)) == 0
    assert any("LoRA rank 4" in m and "trainable parameters" in m for m in logs)
    assert main(sft_args(base_run, sft_file, split, *lora, "--stop-after", "2")) == 0
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    a, b = final_weights(whole), final_weights(split)
    assert_same_weights(a, b)
    base = final_weights(base_run)
    adapters = [k for k in a if "lora_" in k]
    assert adapters and any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in adapters)
    # the frozen weights did not move
    for k, v in base.items():
        key = k if k in a else ".base_layer.".join(k.rsplit(".", 1))
        assert torch.equal(a[key], v), k


def test_merged_lora_export_gives_the_unmerged_models_logits(base_run, sft_file, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(sft_args(base_run, sft_file, run, "--lora-rank", "4", "--max-steps", "3",
                         "--lora-targets", "qkv,fc")) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert not [k for k in load_file(str(tmp_path / "hf" / "model.safetensors")) if "lora" in k]
    unmerged = load(run, "cpu")
    assert any("lora_" in n for n, _ in unmerged.model.named_parameters())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([instruction(ChatTemplate(), unmerged.tokenizer, "Use cat and dog.")])
    with torch.no_grad():
        assert (unmerged.model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_lora_targets_that_match_no_layer_are_listed(base_run, sft_file, tmp_path, capsys):
    code = main(sft_args(base_run, sft_file, tmp_path / "run", "--lora-rank", "4", "--lora-targets", "qkv,gate"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "gate" in err and "fc, lm_head, proj, qkv" in err, err
    assert not (tmp_path / "run").exists()


def test_lora_with_fsdp_is_refused(stories_file, capsys, tmp_path):
    code = main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(tmp_path / "run"),
                 "--lora-rank", "4", "--parallel", "fsdp"])
    err = capsys.readouterr().err
    assert code == 2 and "FSDP" in err and err.count("\n") == 1


# ---------------------------------------------------------------- bad sft records

@pytest.mark.parametrize("record, words", [
    ({"prompt": "Hi."}, ["bad.jsonl:2", "'response'"]),
    ({"question": "Hi.", "response": "Yo."}, ["bad.jsonl:2", "'prompt'"]),
    ({"prompt": "Hi.", "response": "  "}, ["bad.jsonl:2", "empty"]),
    ({"messages": [{"role": "user", "content": "Hi."}, {"role": "robot", "content": "Yo."}]},
     ["bad.jsonl:2", "unknown role 'robot'"]),
    ({"messages": [{"role": "user", "content": "Hi."}]}, ["bad.jsonl:2", "last message", "assistant"]),
    ({"prompt": "word " * 80, "response": "Yo."}, ["no room", "tokens long", "--seq-len"]),
])
def test_bad_sft_records_are_refused_in_one_line(base_run, tmp_path, capsys, record, words):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi.", "response": "Yo."}, record] * 10)
    code = main(sft_args(base_run, data, tmp_path / "run", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_the_no_room_error_counts_the_prompts_tokens(base_run, tmp_path, capsys):
    tok = get_tokenizer(str(base_run / "tokenizer"))
    prompt = "word " * 80
    n = len(instruction(ChatTemplate(), tok, prompt)) - 1
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": prompt, "response": "Yo."}] * 20)
    assert main(sft_args(base_run, data, tmp_path / "run", "--max-steps", "1")) == 2
    assert f"the prompt is {n} tokens long" in capsys.readouterr().err


def test_messages_records_learn_every_answer(small_tokenizer, tmp_path):
    tok = get_tokenizer(str(small_tokenizer))
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Bye now."}]}] * 4)
    cfg = config(data, tokenizer=small_tokenizer, format="sft", story_mask=True, seq_len=64, train_frac=1.0,
                 val_frac=0.0)
    rows = SFTRows(prepare_sft(cfg.data, cfg.chat, cfg.seed, tok).train, 64, pack=False)
    labels = rows[0]["labels"]
    assert tok.decode([int(i) for i in labels if i != IGNORE_INDEX and i != tok.eot_id]) == "Hello.\nBye now."


# ---------------------------------------------------------------- chat

@pytest.fixture(scope="module")
def sft_run(base_run, sft_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("sft-run") / "run"
    assert main(sft_args(base_run, sft_file, run, "--max-steps", "3")) == 0
    return run


@pytest.mark.slow
def test_chat_streams_answers_keeps_history_and_drops_the_oldest_turns_once(sft_run):
    import io
    import subprocess
    import sys

    from cairn.inference.chat import ChatSession, run_chat
    from cairn.inference.generate import SamplingConfig

    lines = ["Use cat and dog.", "/temperature 0.5", "Use hat and kite.", "Use boat and tree.", "/reset",
             "Use cake and ball.", "Use dog and hat.", "Use tree and cat.", "Use kite and boat.", "Use cat and hat.",
             "/quit", "Never read."]
    stdin = "\n".join(lines) + "\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "cairn", "chat", str(sft_run), "--max-new-tokens", "24",
                           "--device", "cpu"], input=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # the same session in-process: the same answers, seed by seed, with the history each turn had
    loaded = load(sft_run, "cpu")
    session = ChatSession(loaded.model, loaded.tokenizer, ChatTemplate.from_config(loaded.config.chat),
                          SamplingConfig(max_new_tokens=24, temperature=0.8, top_k=50, seed=1234))
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, io.StringIO(stdin), out, err, interactive=False)
    assert done.stdout == out.getvalue() and done.stdout.count("\n") == 8
    assert "(temperature 0.5)" in done.stderr and "(conversation forgotten)" in done.stderr
    assert done.stderr.count("oldest turns are left out") == 1
    # dropped again after /reset, and not said again
    assert session.turns == 8 and session.history[0]["content"] != "Use cake and ball."


def test_chat_refuses_a_message_longer_than_the_context_and_goes_on(sft_run):
    import io

    from cairn.inference.chat import ChatSession, run_chat
    from cairn.inference.generate import SamplingConfig

    loaded = load(sft_run, "cpu")
    session = ChatSession(loaded.model, loaded.tokenizer, ChatTemplate(), SamplingConfig(max_new_tokens=8))
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, io.StringIO("word " * 200 + "\nUse cat.\n"), out, err, interactive=False)
    assert "write a shorter one" in err.getvalue() and out.getvalue().count("\n") == 1


# ---------------------------------------------------------------- the words task

def test_a_story_honours_its_words_only_with_each_whole_word():
    from cairn.tasks.words import uses_all, words_found

    assert uses_all("The Cat sat. A dog ran; the HAT fell.", ["cat", "dog", "hat"])
    assert not uses_all("The cats sat in a scattered hat with a dog.", ["cat", "dog", "hat"])
    assert not uses_all("", ["cat"])
    assert words_found("The cats sat with a dog and a Dog.", ["cat", "dog", "hat"]) == 1


def test_eval_words_reports_the_fraction_of_prompts_honoured(sft_run, tmp_path, capsys):
    from cairn.tasks.words import uses_all

    data = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "Use cat and dog.", "words": ["cat", "dog"]},
                                              {"prompt": "Use hat.", "words": ["hat"]},
                                              {"prompt": "Use a.", "words": ["a"]}])
    assert main(["eval", str(sft_run), "--task", "words", "--data", str(data), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prompts"] == 3 and [s["seed"] for s in r["samples"]] == [0, 1, 2]
    assert r["honoured"] == sum(uses_all(s["story"], s["words"]) for s in r["samples"])
    assert r["rate"] == r["honoured"] / 3 and r["word_rate"] == sum(s["words_found"] for s in r["samples"]) / 4
    assert r["prompt_gain"] is None  # no stories given
    stories = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Use cat and dog.", "words": ["cat", "dog"],
                                                  "response": "A cat and a dog."},
                                                 {"prompt": "Use hat.", "words": ["hat"], "response": "A red hat."}])
    assert main(["eval", str(sft_run), "--task", "words", "--data", str(stories), "--device", "cpu"]) == 0
    assert "prompt gain" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Use cat."}])
    assert main(["eval", str(sft_run), "--task", "words", "--data", str(bad)]) == 2
    assert "'words'" in capsys.readouterr().err


def test_word_token_positions_are_the_tokens_that_spell_each_whole_word(small_tokenizer):
    from cairn.tasks.words import word_token_positions

    tok = get_tokenizer(str(small_tokenizer))
    head = tok.encode("User: Use cat.")
    ids = head + tok.encode(" The cat and the cats saw a Dog, then a dog.")
    at = word_token_positions(tok, ids, len(head), ["cat", "dog"])
    runs = []  # consecutive positions spell one occurrence
    for j in at:
        if runs and j == runs[-1][-1] + 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    assert [tok.decode([ids[j] for j in run]).strip() for run in runs] == ["cat", "Dog", "dog"]  # not "cats"


def test_prompt_gain_is_the_log_probability_the_right_prompt_adds_to_the_asked_words(sft_run):
    from cairn.tokenizer.chat_template import encode_conversation
    from cairn.tasks.words import prompt_gain, word_token_positions

    loaded = load(sft_run, "cpu")
    template = ChatTemplate.from_config(loaded.config.chat)
    records = [{"prompt": "Use cat and dog.", "words": ["cat", "dog"], "response": "Tom saw a cat. Then a dog came."},
               {"prompt": "Use hat.", "words": ["hat"], "response": "A hat fell on the boat."}]
    got = prompt_gain(loaded, records)

    def word_logprob(prompt, record):  # through the model's own loss path (labels), not the function's
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["response"]}]
        ids, target = encode_conversation(template, loaded.tokenizer, messages)
        at = word_token_positions(loaded.tokenizer, ids, target.index(True), record["words"])
        labels = torch.full((len(ids) - 1,), IGNORE_INDEX)
        labels[[j - 1 for j in at]] = torch.tensor([ids[j] for j in at])
        with torch.no_grad():
            loss_sum, n = loaded.model(torch.tensor([ids[:-1]]), labels=labels[None])
        return -loss_sum.item(), int(n)

    right = [word_logprob(r["prompt"], r) for r in records]
    wrong = [word_logprob(records[1 - i]["prompt"], r) for i, r in enumerate(records)]
    n = sum(k for _, k in right)
    assert got["word_tokens"] == n == sum(k for _, k in wrong) >= 3
    assert got["logprob_right"] == pytest.approx(sum(v for v, _ in right) / n, abs=1e-4)
    assert got["gain"] == pytest.approx((sum(v for v, _ in right) - sum(v for v, _ in wrong)) / n, abs=1e-4)


def test_eval_and_generate_read_an_instruction_tuned_run_through_its_template(sft_run, sft_file, capsys):
    assert main(["eval", str(sft_run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    answers = json.loads((sft_run / "run.json").read_text())["data"]["splits"]["test"]["answer_tokens"]
    assert r["tokens"] == answers  # the held-out answers, not the prompts
    assert main(["eval", str(sft_run), "--data", str(sft_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > answers
    assert main(["generate", str(sft_run), "--prompt", "Use cat.", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "User: Use cat.\nAssistant: "
    assert main(["generate", str(sft_run), "--prompt", "Use cat.", "--max-new-tokens", "4", "--json",
                 "--no-template"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "Use cat."


def test_init_from_a_lora_run_starts_from_its_merged_weights(base_run, sft_file, tmp_path, stories_file):
    from cairn.training.build import build_trainer
    from cairn.training.distributed import session
    from cairn.training.init_from import apply

    lora_run = tmp_path / "lora"
    assert main(sft_args(base_run, sft_file, lora_run, "--lora-rank", "4", "--max-steps", "2",
                         "--end-stories", "0")) == 0
    merged = load(lora_run, "cpu", merge=True).model.weights()
    assert not [k for k in merged if "lora" in k]
    cfg = validate(apply(config(stories_file, init_from=str(lora_run), max_steps=2, num_threads=1)))
    with session(cfg.system) as dist:
        trainer = build_trainer(cfg, tmp_path / "run", dist)
    assert_same_weights(trainer.model.weights(), merged)
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], final_weights(base_run)["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("pack", [True, False])
def test_sft_rows_know_their_lengths_without_building_them(pack):
    """Scoring batches rows by length at every evaluation: the lengths SFTRows gives from its
    examples are those of the rows it builds."""
    import numpy as np

    from cairn.data.batching import row_lengths
    from cairn.data.formats.sft import Example, SFTSplit

    rng = np.random.default_rng(0)
    examples = [Example(np.r_[0, rng.integers(1, 50, n), 0], np.r_[0, np.ones(n + 1, dtype=bool)])
                for n in rng.integers(2, 20, 40)]
    rows = SFTRows(SFTSplit(examples, []), 40, pack=pack)
    built = [len(rows[i]["input_ids"]) for i in range(len(rows))]
    assert rows.lengths().tolist() == built and row_lengths(rows).tolist() == built
    assert pack == (len(rows) < len(examples))  # packing put several examples in a row
