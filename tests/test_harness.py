"""`cairn eval RUN --harness TASKS`: lm-evaluation-harness on a cairn run, its story tasks, and the
`CairnLM` model against `cairn eval` and against lm-eval's own HFLM on the run's Hugging Face export."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from cairn.checkpoint.load import load  # noqa: E402
from cairn.cli import main  # noqa: E402
from cairn.data import load_texts  # noqa: E402
from cairn.data.batching import StoryWindows  # noqa: E402
from cairn.data.cache import SplitTokens  # noqa: E402
from cairn.eval.harness import _load_tasks, evaluate_harness, task_names  # noqa: E402
from cairn.eval.harness_lm import CairnLM, rolling_windows, windows  # noqa: E402
from cairn.eval.story_tasks import ENDING, PPL, ending_items, sentences, write_tasks  # noqa: E402
from cairn.model.ops import IGNORE_INDEX  # noqa: E402
from cairn.runtime.device import autocast  # noqa: E402
from cairn.util.errors import CairnError  # noqa: E402

EOT = 0


def scored_pairs(rows) -> list[tuple[tuple[int, ...], int]]:
    """(what a target is predicted from, the target) for every scored target of `CairnLM` windows."""
    out = []
    for w in rows:
        n = len(w.tokens) - 1
        assert n >= 1 and 1 <= w.scored <= n
        out += [(tuple(w.tokens[:j + 1]), w.tokens[j + 1]) for j in range(n - w.scored, n)]
    return out


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 7, 8])
def test_rolling_windows_give_each_token_the_context_cairn_eval_gives_it(seq_len):
    for n in range(1, 4 * seq_len + 3):
        ids = list(range(1, n + 1))
        got = rolling_windows(ids, EOT, seq_len, max(1, seq_len // 2))
        assert all(len(w.tokens) - 1 <= seq_len for w in got)
        rows = StoryWindows(SplitTokens(np.array([*ids, EOT]), np.array([0, n + 1]), n, EOT), seq_len)
        expected = []
        for i in range(len(rows)):
            x, y = rows[i]["input_ids"].tolist(), rows[i]["labels"].tolist()
            expected += [(tuple(x[:j + 1]), t) for j, t in enumerate(y) if t != IGNORE_INDEX]
        # cairn eval also scores the story's <|endoftext|>; lm-eval's rolling likelihood is the text's alone
        assert expected[-1][1] == EOT
        assert scored_pairs(got) == expected[:-1], (seq_len, n)


@pytest.mark.parametrize("seq_len,stride", [(4, 2), (5, 1), (6, 6), (8, 3)])
def test_a_continuation_longer_than_a_window_is_scored_once_per_token_with_context(seq_len, stride):
    ids = list(range(100, 140))
    for first in (0, 1, 5, 17):
        pairs = scored_pairs(windows(ids, first, seq_len, stride))
        assert [t for _, t in pairs] == ids[first + 1:]
        for k, (context, target) in enumerate(pairs):
            assert len(context) <= seq_len
            position = first + k
            assert target == ids[position + 1]
            assert context == tuple(ids[position + 1 - len(context):position + 1])
            assert len(context) >= min(position + 1, seq_len - stride + 1)


STORIES = [
    "Tom had a red ball. He threw it high. The ball landed in a tree.",
    "Mia found a cat. \"Can I keep it?\" she asked. Her mom said yes!",
    "The sun was hot. Ben ate a cold ice cream.",
    "Sue wanted to fly. She made paper wings. Then she laughed with her dad?",
    "A small dog barked. It was hungry. Anna gave it a bone.",
    "One word only",
]


def test_ending_items_are_seeded_and_hold_the_true_ending_among_other_stories_endings():
    items = ending_items(STORIES, seed=3)
    assert len(items) == 5  # the one-sentence story has no context to end
    assert ending_items(STORIES, seed=3) == items
    assert ending_items(STORIES, seed=4) != items
    endings = {sentences(s)[-1] for s in STORIES[:5]}
    for story, item in zip(STORIES, items):
        true = sentences(story)[-1]
        assert item.choices[item.label] == true and item.context + " " + true == story
        assert len(set(item.choices)) == 4 and set(item.choices) <= endings
    assert sentences(STORIES[1]) == ["Mia found a cat.", "\"Can I keep it?\" she asked.", "Her mom said yes!"]
    assert sorted({item.label for item in ending_items(STORIES * 8, seed=0)}) == [0, 1, 2, 3]


def test_ending_items_need_four_different_endings():
    with pytest.raises(CairnError, match="at least 4 different last sentences"):
        ending_items(STORIES[:3] + [STORIES[0]], seed=0)


def test_task_names_expand_the_story_tag_and_refuse_empty_names():
    assert task_names("cairn_stories") == [PPL, ENDING]
    assert task_names(" hellaswag , cairn_story_ppl,cairn_stories") == ["hellaswag", PPL, ENDING]
    with pytest.raises(CairnError, match="separated by commas"):
        task_names("cairn_story_ppl,,hellaswag")


@pytest.mark.slow
def test_an_unknown_task_name_is_one_line(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_tasks(tmp_path, STORIES, 0)), include_defaults=False)
    with pytest.raises(CairnError, match="lm-eval has no task 'no_such_task'"):
        _load_tasks(manager, [PPL, "no_such_task"])


def test_the_story_tasks_refuse_a_run_of_instruction_records():
    from pathlib import Path

    from cairn.checkpoint.load import Loaded
    from cairn.config.presets import preset
    from cairn.eval.story_tasks import held_out_stories

    loaded = Loaded(torch.nn.Linear(1, 1), preset("cpu-instruct"), None, Path("run"), {}, torch.device("cpu"))
    with pytest.raises(CairnError, match="trained on sft records: give lm-eval's own tasks"):
        held_out_stories(loaded, None, "test")


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(CairnError, match=r"pip install 'cairn-lm\[harness\]'"):  # before the run is read
        evaluate_harness(tmp_path / "no-run", "cairn_story_ppl")


def cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def stories(trained_run, tmp_path_factory):
    """Twelve real stories (the run's own data: what matters is that both evaluations read the same)."""
    texts = load_texts(str(trained_run.data))[:12]
    path = tmp_path_factory.mktemp("harness") / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path, texts


@pytest.mark.slow
def test_story_bits_per_byte_is_cairn_evals_without_the_end_of_text(trained_run, stories):
    path, texts = stories
    code, out = cli(["eval", str(trained_run.run), "--data", str(path), "--json"])
    assert code == 0
    ours = json.loads(out)
    code, out = cli(["eval", str(trained_run.run), "--data", str(path), "--harness", PPL, "--json"])
    assert code == 0
    theirs = json.loads(out)
    r = theirs["results"][PPL]
    assert theirs["samples"][PPL] == len(texts) and theirs["what"] == f"{path} ({len(texts)} stories)"
    assert abs(r["bits_per_byte"] - ours["bits_per_byte"]) / ours["bits_per_byte"] < 0.01
    assert math.isclose(r["byte_perplexity"], 2 ** r["bits_per_byte"], rel_tol=1e-9)

    # exactly: cairn eval's loss = lm-eval's (from its bits per byte and its byte count) + each story's
    # <|endoftext|>, predicted from the last seq_len tokens of the story
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    lm = CairnLM(load(trained_run.run, "cpu"))
    tok, seq_len = lm.tokenizer, lm.seq_len
    end_nll = 0.0
    with torch.no_grad(), autocast(lm.loaded.device, lm.precision):
        for text in texts:
            row = [tok.eot_id, *tok.encode(text)][-seq_len:]
            end_nll -= float(torch.log_softmax(lm.model(torch.tensor([row]))[0, -1].float(), -1)[tok.eot_id])
    harness_nll = r["bits_per_byte"] * n_bytes * math.log(2)
    assert end_nll > 0
    assert math.isclose(harness_nll + end_nll, ours["loss"] * ours["tokens"], rel_tol=1e-4)


@pytest.mark.slow
def test_cairn_lm_scores_what_lm_evals_hflm_scores_on_the_hf_export(trained_run, stories, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from cairn.export.hf import export_hf

    _, texts = stories
    export_hf(trained_run.run, tmp_path / "hf")
    ours = CairnLM(load(trained_run.run, "cpu"), precision="fp32")
    hflm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=8, max_length=ours.seq_len,
                prefix_token_id=ours.eot_id)
    items = ending_items(texts, seed=0)[:6]
    # HFLM reads a context as given: cairn's reads it after <|endoftext|>, written out for HFLM
    pairs = [(item.context, " " + choice) for item in items for choice in item.choices]
    got = ours.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    want = hflm.loglikelihood([Instance("loglikelihood", {}, ("<|endoftext|>" + c, x), i)
                               for i, (c, x) in enumerate(pairs)])
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) < 1e-3
    assert [a[1] for a in got] == [b[1] for b in want]
    # rolling: the same for texts that fit one window (past one, HFLM's windows are disjoint)
    short = [s for t in texts for s in sentences(t)][:8]
    assert all(len(ours.tokenizer.encode(s)) < ours.seq_len for s in short)
    requests = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(short)]
    assert np.allclose(ours.loglikelihood_rolling(requests), hflm.loglikelihood_rolling(requests), atol=1e-3)
    # greedy generation up to a stop string
    settings = {"until": ["."], "max_gen_toks": 24, "do_sample": False}
    got = ours.generate_until([Instance("generate_until", {}, (s, settings), i) for i, s in enumerate(short[:3])])
    want = hflm.generate_until([Instance("generate_until", {}, ("<|endoftext|>" + s, settings), i)
                                for i, s in enumerate(short[:3])])
    assert got == want and any(got)


def test_lm_evals_own_entry_point_builds_the_cairn_model_from_its_arguments(trained_run):
    import lm_eval.api.registry

    cls = lm_eval.api.registry.get_model("cairn")
    assert cls is CairnLM
    lm = cls.create_from_arg_string(f"path={trained_run.run},precision=fp32,device=cpu")
    assert (lm.precision, lm.seq_len, str(lm.loaded.path.parent.parent)) == ("fp32", 64, str(trained_run.run))
    with pytest.raises(CairnError, match="path=RUN_DIR_OR_CHECKPOINT"):
        cls.create_from_arg_string("device=cpu")


@pytest.mark.slow
def test_cli_prints_a_table_of_both_story_tasks_on_the_runs_test_split(trained_run):
    code, out = cli(["eval", str(trained_run.run), "--harness", "cairn_stories", "--limit", "6"])
    assert code == 0, out
    lines = out.splitlines()
    assert "test split (" in lines[0] and lines[1].split() == ["task", "docs", "metric", "value", "stderr"]
    rows = {(r.split()[0], r.split()[2]): r.split() for r in lines[2:]}
    assert set(rows) == {(PPL, "word_perplexity"), (PPL, "byte_perplexity"), (PPL, "bits_per_byte"),
                         (ENDING, "acc"), (ENDING, "acc_norm"), (ENDING, "acc_mutual_info")}
    assert all(r[1] == "6" for r in rows.values())
    assert 0.0 <= float(rows[ENDING, "acc"][3]) <= 1.0 and rows[ENDING, "acc"][4] == "±"


@pytest.mark.slow
def test_an_lm_eval_task_that_cannot_load_offline_is_one_line(trained_run, capsys):
    assert main(["eval", str(trained_run.run), "--harness", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: lm-eval cannot load task 'hellaswag': ") and "Traceback" not in "".join(err)


def test_the_use_elsewhere_page_quotes_the_harness_record():
    from cairn.bench.record import read_result
    from conftest import REPO

    text = (REPO / "docs" / "use-elsewhere.md").read_text(encoding="utf-8").split("## lm-evaluation-harness")[1]
    result = read_result(REPO / "benchmarks" / "records" / "harness-cpu-10min.json")
    own, runs = result["cairn_eval"], result["harness"]
    for name in ("cairn", "cairn_fp32", "cairn_untrained", "hflm_export_fp32"):
        ppl, ending = runs[name]["results"][PPL], runs[name]["results"][ENDING]
        assert (f"| {ppl['bits_per_byte']:.4f} | {ppl['word_perplexity']:.1f} | {ending['acc']:.3f} | "
                f"{ending['acc_norm']:.3f} | {ending['acc_mutual_info']:.3f} ± "
                f"{ending['acc_mutual_info_stderr']:.3f} | {runs[name]['seconds']:.0f} |") in text, name
    lower = 1 - runs["cairn"]["results"][PPL]["bits_per_byte"] / own["bits_per_byte"]
    assert f"{lower:.2%} on the run below" in text and f"gives {own['bits_per_byte']:.4f} bits per byte" in text
    assert f"test split of {runs['cairn']['samples'][PPL]} stories" in text
    bpb = {name: r["results"][PPL]["bits_per_byte"] for name, r in runs.items()}
    hflm = bpb["hflm_export_fp32"] - bpb["cairn_fp32"]
    assert f"costs it {hflm:.4f} bits per\nbyte here" in text
    mutual = {name: r["results"][ENDING]["acc_mutual_info"] for name, r in runs.items()}
    assert f"{mutual['cairn']:.2f} against the untrained model's\n{mutual['cairn_untrained']:.2f}" in text
    assert 0.4 < runs["cairn"]["seconds"] / runs["hflm_export_fp32"]["seconds"] < 0.6  # "about half the time"
