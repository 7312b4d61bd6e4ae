"""Training under torchrun on CPU (gloo): 2 processes against 1, DDP and FSDP, resume, failures.

Each distributed run is a real `torchrun --nproc_per_node 2 --standalone -m cairn train`. The
comparisons run the same global batch (2 processes x batch 2 against 1 process x batch 4, both
with 2 accumulation steps) in padded batches, so the ranks hold different numbers of real tokens
and only an exact global token mean makes the runs agree.

Tolerances. The 2-process runs add the same float32 numbers in another order (each rank's half of
the batch, then gloo's reduction), so they agree with the 1-process run to rounding, not bitwise.
Measured on this test's runs (10 steps, the shared 384-token tokenizer), asserted with margin:
- losses (train, validation, test): within 1.3e-7 relative; asserted LOSS_REL = 1e-5;
- gradient norms: DDP within 1e-7, FSDP within 3e-7 relative (FSDP adds its shards' parts in
  another order; with GPT-2's vocabulary, torch's float32 norm of the 1.6M-entry output-layer
  gradient alone was ~1e-4 off the float64 value, and FSDP within 3e-4); asserted NORM_REL = 1e-3
  (a gradient scaled by the wrong number of ranks or tokens is off by 2x);
- final weights: mean absolute difference 4e-9 (DDP and FSDP), asserted MEAN_ATOL = 1e-6;
  largest 4.8e-6 (DDP), 3.8e-6 (FSDP), asserted MAX_ATOL = 5e-4 (weights are ~0.1, the learning
  rate 3e-3): the largest sit where a gradient is near zero (the key bias, which softmax ignores;
  rare tokens' output rows), where Adam's division by the gradient's running size turns rounding
  into visible steps.
A stopped and resumed run with the same number of processes repeats the same arithmetic: bitwise.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES
from safetensors.torch import load_file

from cairn.config.sections import RunConfig

from cairn.config.io import apply_overrides, load_toml
from cairn.config.presets import preset
from cairn.data import PackedDataset, PaddedDataset, SplitTokens, make_loader
from cairn.util.errors import CairnError
from cairn.training import train

LOSS_REL, NORM_REL, MEAN_ATOL, MAX_ATOL = 1e-5, 1e-3, 1e-6, 5e-4
STEPS, STOP = 10, 5
PER_RANK = {"batch_size": 2}
SINGLE = {"batch_size": 4}  # the same global batch in one process
LAUNCH_TIMEOUT = 300  # a hang fails the test instead of stalling CI

def options(cache: Path, tokenizer, **extra) -> dict:
    """The comparison runs' settings; tokenizer: a directory (the shared small tokenizer) or bpe:N."""
    return {"source": str(TINYSTORIES), "n_samples": 200, "cache_dir": str(cache), "tokenizer": str(tokenizer),
            "batching": "pad",
            "d_model": 32, "n_heads": 4, "n_layers": 2, "d_mlp": 64, "context_len": 64, "seq_len": 32,
            "grad_accum": 2, "max_steps": STEPS, "report_every": 1, "eval_every": 5, "eval_batches": 3,
            "checkpoint_every": STOP, "patience": 0, "num_threads": 1, **extra}


def cli_args(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(*args: str, script: Path = None, nproc: int = 2) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "cairn"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)


def launch_train(out: Path, opts: dict, *extra: str) -> str:
    r = torchrun("train", "--preset", "tiny", "--out", str(out), "--no-progress", *cli_args(opts), *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def launch_resume(run: Path, *extra: str) -> str:
    r = torchrun("train", "--resume", str(run), "--no-progress", *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def records(run: Path) -> list[dict]:
    timing = ("time", "tokens_per_s", "mfu")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    return load_file(str(next((run / "checkpoints").glob("*_final")) / "model.safetensors"))


def assert_close_runs(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in x:
            if key.endswith("_loss"):
                assert y[key] == pytest.approx(x[key], rel=LOSS_REL), (x["kind"], x["step"], key)
        if x["kind"] == "train":
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=NORM_REL), x["step"]
        assert x.get("tokens") == y.get("tokens") and x.get("val_tokens") == y.get("val_tokens")
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diff.mean() <= MEAN_ATOL and diff.max() <= MAX_ATOL, (diff.mean().item(), diff.max().item())


def assert_same_runs(a: Path, b: Path) -> None:
    assert records(a) == records(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_tokenizer) -> dict:
    """The 1-process reference, and 2-process DDP and FSDP runs of the same global batch."""
    if not (TINYSTORIES.is_dir() and list(TINYSTORIES.glob("*.jsonl"))):
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES}")
    base = tmp_path_factory.mktemp("dist")
    cache = base / "cache"
    single = base / "single"
    cfg = apply_overrides(preset("tiny"), options(cache, small_tokenizer, **SINGLE))
    train(cfg, single)
    ddp_log = launch_train(base / "ddp", options(cache, small_tokenizer, **PER_RANK))
    launch_train(base / "fsdp", options(cache, small_tokenizer, parallel="fsdp", **PER_RANK))
    return {"base": base, "cache": cache, "tokenizer": small_tokenizer, "single": single, "ddp": base / "ddp",
            "fsdp": base / "fsdp", "ddp_log": ddp_log}


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    assert "2 processes x batch 2 x 2 accumulation = 8 rows" in runs["ddp_log"]
    assert runs["ddp_log"].count("final checkpoint:") == 1  # rank 0 alone logs
    assert [r["kind"] for r in records(runs["ddp"])].count("test") == 1  # ... and writes metrics
    assert_close_runs(runs["single"], runs["ddp"])


@pytest.mark.slow
def test_fsdp_matches_one_process_with_the_same_global_batch(runs):
    assert_close_runs(runs["single"], runs["fsdp"])


@pytest.fixture(scope="module")
def stopped(runs) -> Path:
    """The 2-process FSDP run stopped after STOP steps (tests resume copies of it)."""
    run = runs["base"] / "fsdp-stopped"
    launch_train(run, options(runs["cache"], runs["tokenizer"], parallel="fsdp", **PER_RANK), "--stop-after",
                 str(STOP))
    assert not list((run / "checkpoints").glob("*_final"))
    return run


def stopped_copy(runs, stopped: Path, name: str) -> Path:
    run = runs["base"] / name
    shutil.copytree(stopped, run)
    return run


@pytest.mark.slow
def test_stopped_and_resumed_fsdp_run_equals_the_uninterrupted_one(runs, stopped):
    run = stopped_copy(runs, stopped, "fsdp-resumed")
    out = launch_resume(run)
    assert f"at step {STOP}" in out
    assert_same_runs(runs["fsdp"], run)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_global_batch(logs, runs, stopped):
    run = stopped_copy(runs, stopped, "to-one")
    cfg = apply_overrides(load_toml(run / "config.toml", RunConfig()), SINGLE)
    train(cfg, run, resume=True)
    assert any("2 -> 1 processes with the same 8 rows per step" in m for m in logs)
    assert any("parallel = fsdp" in m and "one process" in m for m in logs)
    assert_close_runs(runs["single"], run)


@pytest.mark.slow
def test_a_resume_with_another_global_batch_mid_epoch_says_what_to_pass(runs, stopped):
    run = stopped_copy(runs, stopped, "wrong-batch")
    cfg = load_toml(run / "config.toml", RunConfig())  # batch 2 in 1 process: 4 rows per step, not 8
    with pytest.raises(CairnError, match=r"2 processes x batch 2 x 2 accumulation = 8 rows.*--batch-size 4"):
        train(cfg, run, resume=True)


# ---------------------------------------------------------------- failures

FAILING = '''\
"""`cairn train` whose rank 1 fails at step 2 as argv[1] says: raise, kill or hang."""
import os, signal, sys, time
from cairn.cli import main
from cairn.training.step import Stepper

how = sys.argv.pop(1)
real = Stepper.__call__

def failing(self, micro, lr, state):
    if self.dist.rank == 1 and state.step == 2:
        if how == "raise":
            raise ValueError("injected failure")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        # A hung rank. torchrun stops the job with SIGTERM, which cairn takes as "checkpoint and
        # stop" and a rank hung in Python would sit out torchrun's 30 s grace; not here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)
    return real(self, micro, lr, state)

Stepper.__call__ = failing
raise SystemExit(main())
'''


@pytest.mark.parametrize("how,message", [
    ("raise", "error: rank 1 of 2 failed: ValueError: injected failure"),
    ("kill", "Signal 9 (SIGKILL) received"),  # a killed rank says nothing: torchrun names it
    ("hang", "error: rank 0 of 2 stopped: it lost contact with the other ranks (Timed out"),
])
@pytest.mark.slow
def test_a_failing_rank_brings_the_job_down_with_a_message(tmp_path, stories_file, small_tokenizer, how,
                                                           message):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    r = torchrun(how, "train", "--preset", "tiny", "--data", str(stories_file), "--out", str(tmp_path / "run"),
                 "--tokenizer", str(small_tokenizer), "--no-progress", "--d-model", "16", "--n-heads", "2",
                 "--n-layers", "1", "--d-mlp", "32", "--seq-len", "32", "--batch-size", "2", "--max-steps", "8",
                 "--num-threads", "1", "--dist-timeout-s", "5", script=script)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert message in out, out[-4000:]


# ---------------------------------------------------------------- without processes


def labels(ds, batch_size: int, train: bool, **share) -> list[torch.Tensor]:
    loader = make_loader(ds, batch_size, shuffle=train, seed=3, epoch=1, drop_last=train, **share)
    return [b["labels"] for b in loader]


def test_ranks_share_each_global_batch_as_one_process_would_see_it(small_tokenizer):
    from conftest import make_stories

    from cairn.tokenizer.base import get_tokenizer

    split = SplitTokens.from_texts(make_stories(31), get_tokenizer(str(small_tokenizer)))
    for ds in (PackedDataset(split, 16), PaddedDataset(split, 16)):
        for train_order in (True, False):  # shuffled full batches; in order with a short last batch
            whole = labels(ds, 6, train_order)
            shares = [labels(ds, 2, train_order, rank=r, world=3) for r in range(3)]
            assert len(shares[0]) == len(whole) and (train_order or len(ds) % 6)
            for i, batch in enumerate(whole):
                parts = [s[i] for s in shares if i < len(s)]
                pad = [torch.nn.functional.pad(p, (0, batch.shape[1] - p.shape[1]), value=-100) for p in parts]
                assert torch.equal(torch.cat(pad), batch)
        # a resume position counts global batches
        assert all(torch.equal(a, b) for a, b in zip(labels(ds, 2, True, rank=1, world=3, start_batch=2),
                                                      labels(ds, 2, True, rank=1, world=3)[2:]))


def test_parallel_must_be_ddp_or_fsdp():
    from cairn.config.sections import validate

    with pytest.raises(CairnError, match="system.parallel must be 'ddp' or 'fsdp'"):
        validate(apply_overrides(preset("tiny"), {"source": "x", "parallel": "zero3"}))


@pytest.mark.slow
def test_a_checkpoint_with_the_optimizer_state_by_position_still_resumes(tmp_path, stories_file,
                                                                        small_tokenizer):
    """Checkpoints written before the state was keyed by parameter name hold torch's own format."""
    from cairn.checkpoint import store as ckpt

    opts = {"source": str(stories_file), "tokenizer": str(small_tokenizer), "d_model": 16, "n_heads": 2, "n_layers": 1,
            "d_mlp": 32, "seq_len": 32, "batch_size": 4, "max_steps": 6, "eval_every": 0, "checkpoint_every": 3,
            "patience": 0}
    full, part = tmp_path / "full", tmp_path / "part"
    train(apply_overrides(preset("tiny"), opts), full)
    train(apply_overrides(preset("tiny"), opts), part, stop_after=3)
    f = ckpt.latest(part / "checkpoints") / "trainer.pt"
    trainer = torch.load(f, weights_only=True)
    named = trainer["optimizer"]
    order = [name for group in named["param_groups"] for name in group["params"]]
    assert isinstance(order[0], str)
    trainer["optimizer"] = {
        "state": {order.index(name): v for name, v in named["state"].items()},
        "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]} for g in named["param_groups"]]}
    torch.save(trainer, f)
    train(apply_overrides(preset("tiny"), opts), part, resume=True)
    assert_same_runs(full, part)


@pytest.mark.slow
def test_a_budgeted_fsdp_run_with_a_learned_tokenizer_plans_alike_on_every_rank(tmp_path):
    """Ranks time the calibration differently; if they planned different step counts, or stopped
    at different deadlines, the job would hang in a collective (and fail on LAUNCH_TIMEOUT)."""
    if not TINYSTORIES.is_dir():
        pytest.skip("TinyStories sample not found")
    run = tmp_path / "run"
    # a tokenizer learned on the run's own training split, by rank 0, then loaded by rank 1
    opts = options(tmp_path / "cache", "bpe:300", max_steps=12, time_budget="90s", end_stories=1,
                   end_story_tokens=16)
    out = launch_train(run, opts, "--parallel", "fsdp")
    assert "time budget 90s" in out and "learned tokenizer" in out
    plan = json.loads((run / "run.json").read_text())["plan"]
    assert plan["budget_s"] == 90 and 0 < plan["total_steps"] <= 12
    steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert steps[-1] == plan["total_steps"]  # run.json holds the plan followed to the end
    assert (run / "stories.md").read_text().count("## Story") == 1
    assert (run / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_last_batch_with_fewer_rows_than_processes_trains_as_in_one_process(tmp_path, small_tokenizer):
    """An epoch's last global batch of one row, over 2 processes: rank 1's share is empty, so it
    steps on a row that counts nothing; the run equals one process's, which trains on that row."""
    from cairn.data import prepare_data
    from cairn.tokenizer.base import get_tokenizer
    from cairn.training.loop import epoch_steps_text

    if not (TINYSTORIES.is_dir() and list(TINYSTORIES.glob("*.jsonl"))):
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES}")
    cache = tmp_path / "cache"
    opts = options(cache, small_tokenizer, batching="pack", n_samples=30, grad_accum=1, max_steps=0, epochs=1,
                   eval_every=0, checkpoint_every=0, end_stories=0)
    for seq_len in range(24, 48):  # a split of an odd number of windows: one row left after the pairs
        cfg = apply_overrides(preset("tiny"), {**opts, "seq_len": seq_len, "batch_size": 2})
        data = prepare_data(cfg.data, cfg.seed, get_tokenizer(str(small_tokenizer)))
        if len(PackedDataset(data.train, seq_len)) % 2 == 1:
            break
    n = len(PackedDataset(data.train, seq_len))
    assert n % 2 == 1
    train(cfg, tmp_path / "single")
    log = launch_train(tmp_path / "ddp", {**opts, "seq_len": seq_len, "batch_size": 1})
    assert f"each epoch: {epoch_steps_text(n, 2, 1, 'windows')}" in log, log
    assert_close_runs(tmp_path / "single", tmp_path / "ddp")
    steps = [r["step"] for r in records(tmp_path / "ddp") if r["kind"] == "train"]
    assert steps[-1] == n // 2 + 1


SPOILED = '''\
"""`cairn train` whose weights are spoiled just before the end: it must end on its best ones.
Then it names the gloo threads still running: those of a process group that outlived the run."""
import os
import sys
import torch
from cairn.cli import main
from cairn.training.loop import Trainer

real = Trainer.finish

def spoiled(self, stopped):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in self.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    return real(self, stopped)

Trainer.finish = spoiled
code = main()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
sys.stdout.flush()  # the line in one write: the other rank writes to the same pipe
print(f"rank {os.environ['RANK']} gloo threads left: {sorted(n for n in names if 'gloo' in n)}", flush=True)
raise SystemExit(code)
'''


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_distributed_run_ends_on_its_best_weights(tmp_path, stories_file, small_tokenizer, parallel):
    """Under torchrun the best checkpoint's weights reach every rank (FSDP: into its shards), are
    validated there and saved as the final checkpoint; the last state stays resumable."""
    from cairn.checkpoint import store as ckpt

    script = tmp_path / "spoiled.py"
    script.write_text(SPOILED)
    out = tmp_path / "run"
    r = torchrun("train", "--preset", "tiny", "--data", str(stories_file), "--out", str(out), "--tokenizer",
                 str(small_tokenizer), "--no-progress", "--d-model", "16", "--n-heads", "2", "--n-layers", "1",
                 "--d-mlp", "32", "--seq-len", "32", "--batch-size", "2", "--max-steps", "10", "--eval-every", "4",
                 "--eval-batches", "1", "--epoch-val", "sample", "--checkpoint-every", "0", "--end-stories", "1",
                 "--end-story-tokens", "8", "--num-threads", "1", "--parallel", parallel, script=script)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "the run ends on step 8's" in r.stdout, r.stdout[-3000:]
    # the process groups end with the run, not at interpreter exit, where a gloo worker thread still
    # freeing a collective's tensors aborted the process now and then. Under FSDP, DTensor's own
    # caches keep torch's default group (its file group ends)
    left = dict(re.findall(r"rank (\d) gloo threads left: (\[.*?\])", r.stdout))
    assert set(left) == {"0", "1"} and (parallel == "fsdp" or set(left.values()) == {"[]"}), left
    final = ckpt.resolve(out)
    assert ckpt.read_checkpoint(final).meta["weights_step"] == 8
    best = load_file(str(out / "checkpoints" / "tiny_best" / "model.safetensors"))
    got = load_file(str(final / "model.safetensors"))
    assert best.keys() == got.keys() and all(torch.equal(best[k], got[k]) for k in best)
    newest, passed_over = ckpt.newest_resumable(out / "checkpoints")
    assert newest is not None and newest.name.endswith("_step0000010") and passed_over == []
