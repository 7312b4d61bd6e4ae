"""A model on the Hugging Face hub: the export's model card, `cairn push`, and loading by repo id from the
hub cache with cairn and transformers.

huggingface_hub and transformers read HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT when they are imported, so
what depends on them runs in a fresh Python process with those set; the rest runs in-process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cairn.checkpoint import store as ckpt
from cairn.checkpoint.load import load
from cairn.cli import main
from cairn.config.presets import preset
from cairn.export.card import run_scores
from cairn.export.hf import export_hf
from cairn.model.transformer import Transformer
from cairn.tokenizer.base import get_tokenizer
from cairn.version import __version__
from conftest import REPO

REPO_ID = "someone/tiny-stories"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds one


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def card_data(out: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(out / "README.md")  # a local file: parsed offline


def _env(home: Path, **extra: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TMPDIR=str(home / "tmp"),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path, with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the model card


@pytest.mark.slow
def test_the_card_quotes_the_runs_own_held_out_scores_and_parses_back(trained_run, tmp_path):
    run = trained_run.run
    out = export_hf(run, tmp_path / "hf")
    card = card_data(out)
    recs = records(run)
    test = [r for r in recs if r["kind"] == "test"][-1]
    val = [r for r in recs if r["kind"] == "val" and r["full"] and r["step"] == test["step"]][-1]
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("test", "loss"): test["test_loss"], ("test", "perplexity"): test["test_perplexity"],
                   ("test", "bits_per_byte"): test["test_bits_per_byte"],
                   ("validation", "loss"): val["val_loss"], ("validation", "perplexity"): val["val_perplexity"],
                   ("validation", "bits_per_byte"): val["val_bits_per_byte"]}
    d = card.data
    assert (d.library_name, d.license, d.pipeline_tag) == ("transformers", "mit", "text-generation")
    assert {"cairn", "gpt2", "text-generation"} <= set(d.tags)
    assert d.datasets is None  # local files are no hub dataset
    assert {r.dataset_name for r in d.eval_results} == {trained_run.data.name}
    loaded = load(run, device="cpu")
    text = card.text
    assert f"{loaded.model.num_params():,} parameters" in text and "d_model 64, 2 blocks, 4 heads" in text
    assert f"`{loaded.tokenizer.name}`" in text and f"{loaded.tokenizer.vocab_size:,} tokens" in text
    assert "`cairn train --config config.toml`" in text and (run / "config.toml").read_text().strip() in text
    meta = json.loads((out / "cairn.json").read_text())
    assert meta["scores"][0]["loss"] == test["test_loss"] and meta["checkpoint"] == "tiny_final"

    # a step checkpoint's weights are not the ones the test scored, and no whole-split validation ran at its step
    step = export_hf(run / "checkpoints" / "tiny_checkpoint_step0000030", tmp_path / "step30")
    bare = card_data(step)
    assert bare.data.eval_results is None and "model-index" not in bare.content.split("---")[1]
    assert "hold no held-out scores" in bare.text


def test_a_run_that_ended_on_its_best_weights_is_scored_at_their_step(tmp_path):
    # the records a run that ended on step 60's weights writes (training/ending.py, loop.py), a torn last line
    ckpt_dir = tmp_path / "run" / "checkpoints" / "tiny_final"
    ckpt_dir.mkdir(parents=True)
    recs = [{"kind": "val", "step": 60, "val_loss": 2.1, "val_perplexity": 8.17, "val_bits_per_byte": 1.5,
             "val_tokens": 500, "full": False},
            {"kind": "val", "step": 80, "val_loss": 2.3, "val_perplexity": 9.97, "val_bits_per_byte": 1.6,
             "val_tokens": 900, "full": True},
            {"kind": "end_on_best", "step": 80, "best_step": 60, "last_val_loss": 2.3, "best_val_loss": 2.2,
             "last_val_bits_per_byte": 1.6, "best_val_bits_per_byte": 1.55, "ends_on": "best"},
            {"kind": "test", "step": 80, "test_loss": 2.25, "test_perplexity": 9.49, "test_bits_per_byte": 1.58,
             "test_tokens": 880}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "te')
    meta = {"kind": "final", "state": {"step": 80}, "weights_step": 60}
    assert run_scores(ckpt_dir, meta) == [
        {"split": "test", "step": 60, "loss": 2.25, "perplexity": 9.49, "bits_per_byte": 1.58, "tokens": 880},
        {"split": "validation", "step": 60, "loss": 2.2, "perplexity": math.exp(2.2), "bits_per_byte": 1.55,
         "tokens": None}]
    # the last weights: the whole split at step 80, not the sample
    assert run_scores(ckpt_dir, {"kind": "final", "state": {"step": 80}})[1]["loss"] == 2.3
    # a step checkpoint: no test (it scored the final weights), and only a sample at step 60
    assert run_scores(tmp_path / "run" / "checkpoints" / "tiny_checkpoint_step0000060",
                      {"kind": "step", "state": {"step": 60}}) == []
    # a checkpoint outside a run
    assert run_scores(tmp_path / "lone", {"kind": "final", "state": {"step": 80}}) == []


def tiny_model(positions: str = "sinusoidal", tied: bool = False, bias: bool = True, seed: int = 0,
               tokenizer: Path | None = None):
    """The tiny preset's model with random weights, for GPT-2's tokenizer or the one in `tokenizer`."""
    cfg = preset("tiny")
    m = cfg.model
    m.context_len, m.tie_embeddings, m.bias = 96, tied, bias
    if tokenizer is not None:
        cfg.tokenizer, m.vocab_size = str(tokenizer), get_tokenizer(str(tokenizer)).vocab_size
    if positions == "rope":
        m.positions, m.norm, m.mlp, m.d_mlp = "rope", "rmsnorm", "swiglu", 96
    torch.manual_seed(seed)
    model = Transformer(m)
    with torch.no_grad():  # far from the initialisation, so every mapping, transpose and bias shows
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "ln" in name else 0.0))
    return cfg, model.eval()


def save_run(run: Path, cfg, model: Transformer) -> Path:
    """A run directory with one final checkpoint and no metrics, as a run stopped before any evaluation."""
    tok = get_tokenizer(cfg.tokenizer)
    meta = {"kind": "final", "cairn_version": __version__, "config": cfg.to_dict(),
            "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size}, "state": {"step": 7}}
    return ckpt.save_checkpoint(run / "checkpoints" / f"{cfg.name}_final", model.weights(), meta)


# ---------------------------------------------------------------- an export loads back into cairn


@pytest.mark.parametrize("positions,tied,bias,own", [
    ("sinusoidal", False, True, True), ("sinusoidal", True, True, True), ("rope", True, False, True),
    ("rope", False, True, True),
    pytest.param("sinusoidal", False, True, False, marks=pytest.mark.slow)])  # GPT-2's 50,257 tokens: seconds
def test_cairn_loads_its_export_back_with_the_same_weights(tmp_path, small_tokenizer, positions, tied, bias, own):
    cfg, model = tiny_model(positions, tied, bias, tokenizer=small_tokenizer if own else None)
    save_run(tmp_path / "run", cfg, model)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    back = load(out, device="cpu")  # an own tokenizer from the export's tokenizer.json, GPT-2's built in
    assert back.tokenizer.name == get_tokenizer(cfg.tokenizer).name and back.config.model == cfg.model
    ours = model.state_dict()
    theirs = back.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a run without scores: the card says so, and carries no model-index
    card = card_data(out)
    assert card.data.eval_results is None and "hold no held-out scores" in card.text
    assert card.data.datasets == [cfg.data.source] == ["roneneldan/TinyStories"]  # a hub id is the hub's dataset
    assert "## Held-out scores" in card.text and "step 7" in card.text


def test_an_export_whose_position_table_was_changed_is_refused(tmp_path, small_tokenizer, capsys):
    cfg, model = tiny_model(tokenizer=small_tokenizer)
    save_run(tmp_path / "run", cfg, model)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"] + 0.01  # as fine-tuning would move it
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert main(["generate", str(out), "--prompt", "Once"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "position embedding (wpe) is not cairn's fixed sinusoidal table" in err


# ---------------------------------------------------------------- loading by repo id from the hub cache


def _hub_cache(home: Path, repo_id: str, export: Path) -> Path:
    """`export` as huggingface_hub keeps a downloaded model repo: the bytes in blobs/ (named by the git
    blob hash, or the sha256 for a file the hub stores in LFS), snapshots/<commit>/<path> a relative
    symlink to its blob, refs/main holding the commit."""
    from huggingface_hub.utils.sha import git_hash

    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for f in sorted(export.iterdir()):
        content = f.read_bytes()
        lfs = f.suffix == ".safetensors"  # the hub's .gitattributes sends *.safetensors to LFS
        blob = repo / "blobs" / (hashlib.sha256(content).hexdigest() if lfs else git_hash(content))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / REVISION / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / REVISION


# In a process with HF_HOME and HF_HUB_OFFLINE=1 set: huggingface_hub's own lookup finds the snapshot, cairn
# and transformers each load the model by its id, and the command line loads through the same loader
LOAD_BY_ID = """
import contextlib, io, json, shutil, sys, torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer
import cairn
from cairn.cli import main

repo_id, run, step_checkpoint, ids, text = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]

def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

x = torch.tensor([ids])
gen = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "12", "--no-stream"]
with torch.no_grad():
    ours = cairn.load(repo_id, device="cpu")
    run_logits = cairn.load(run, device="cpu").model(x)
    hf = AutoModelForCausalLM.from_pretrained(repo_id).eval()
    hf_logits = hf(x).logits
    tok = AutoTokenizer.from_pretrained(repo_id)
    r = {"cached": try_to_load_from_cache(repo_id, "config.json"),
         "path": str(ours.path), "same_as_run": torch.equal(ours.model(x), run_logits),
         "hf_class": type(hf).__name__, "hf_diff": (hf_logits - run_logits).abs().max().item(),
         "hf_tokens": tok(text)["input_ids"], "cairn_tokens": ours.tokenizer.encode(text),
         "generate_by_id": cli("generate", repo_id, *gen), "generate_by_run": cli("generate", run, *gen),
         "not_cached": cli("generate", "someone/not-cached", *gen), "eval": cli("eval", repo_id, "--json")}
# a directory named like the id, relative to where cairn runs, wins over the hub cache
shutil.copytree(step_checkpoint, repo_id)
r["local"] = str(cairn.load(repo_id, device="cpu").path)
print(json.dumps(r))
"""


@pytest.mark.slow
def test_a_model_in_the_hub_cache_loads_by_repo_id_offline_with_cairn_and_transformers(trained_run, tmp_path):
    pytest.importorskip("transformers")
    run = trained_run.run
    export = export_hf(run, tmp_path / "hf", repo_id=REPO_ID)
    home = tmp_path / "home"
    snapshot = _hub_cache(home, REPO_ID, export)
    loaded = load(run, device="cpu")
    text = "Once upon a time, there was a little dog."
    ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(text)
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run([sys.executable, "-c", LOAD_BY_ID, REPO_ID, str(run),
                        str(run / "checkpoints" / "tiny_checkpoint_step0000030"), json.dumps(ids), text],
                       env=_env(home), capture_output=True, text=True, timeout=240, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["cached"] == str(snapshot / "config.json")  # huggingface_hub itself finds the layout
    assert r["path"] == str(snapshot)
    assert r["same_as_run"] is True  # cairn: the run's very weights, so the very logits
    assert r["hf_class"] == "GPT2LMHeadModel" and r["hf_diff"] <= 1e-4
    assert r["hf_tokens"] == r["cairn_tokens"] == loaded.tokenizer.encode(text)
    # `cairn generate OWNER/NAME` is the run's generate
    by_id, by_run = r["generate_by_id"], r["generate_by_run"]
    assert by_id["code"] == 0, by_id["err"][-2000:]
    assert by_id["out"] == by_run["out"] and by_id["out"].strip()
    # an id neither local nor cached, offline: one line
    missing = r["not_cached"]
    assert missing["code"] == 2 and missing["out"] == ""
    assert missing["err"].strip() == (
        "error: 'someone/not-cached' does not exist as a local path, and as a Hugging Face model id it is not in the "
        "hub cache and the hub cannot be reached (offline or no network): pass a run directory or a checkpoint, or "
        "download it with network")
    assert r["local"] == REPO_ID  # the local directory, not the cached snapshot
    # scored by id on the run's test split, it gives what the card quotes (the run's own test record)
    test = [x for x in records(run) if x["kind"] == "test"][-1]
    scored = json.loads(r["eval"]["out"].strip().splitlines()[-1])
    assert scored["loss"] == pytest.approx(test["test_loss"], rel=1e-5) and scored["tokens"] == test["test_tokens"]
    assert scored["bits_per_byte"] == pytest.approx(test["test_bits_per_byte"], rel=1e-5)


# ---------------------------------------------------------------- cairn push


class RecordingHfApi:
    """huggingface_hub.HfApi's calls `cairn push` makes, recorded, with what the uploaded folder held."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder": folder, "tree": _tree(folder), **kwargs}))

        class Info:
            oid = "c0ffee" * 6 + "c0ff"

        return Info()


def test_push_uploads_exactly_the_export_in_one_commit(tmp_path, small_tokenizer, monkeypatch, capsys):
    import huggingface_hub

    cfg, model = tiny_model(tied=True, tokenizer=small_tokenizer)
    save_run(tmp_path / "run", cfg, model)
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    # other test modules set HF_HUB_OFFLINE=1 before huggingface_hub is imported, and the suite's
    # workers import them all: the recorded hub stands for a reachable one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_recorded")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["push", str(tmp_path / "run"), REPO_ID, "--private", "--revision", "dev", "--message",
                 "first model", "--license", "apache-2.0"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"pushed 8 files to https://huggingface.co/{REPO_ID} (revision dev, commit "
                           "c0ffeec0ffee)")
    names = [c[0] for c in RecordingHfApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    calls = dict(RecordingHfApi.calls)
    assert calls["init"] == {"token": "hf_recorded"}
    assert calls["create_repo"] == {"repo_id": REPO_ID, "repo_type": "model", "private": True, "exist_ok": True}
    assert calls["create_branch"] == {"repo_id": REPO_ID, "branch": "dev", "repo_type": "model", "exist_ok": True}
    up = calls["upload_folder"]
    assert (up["repo_id"], up["revision"], up["commit_message"]) == (REPO_ID, "dev", "first model")
    # the files uploaded are exactly the export's, byte for byte
    reference = export_hf(tmp_path / "run", tmp_path / "reference", repo_id=REPO_ID, license="apache-2.0")
    assert up["tree"] == _tree(reference)
    assert set(up["tree"]) == {"README.md", "cairn.json", "config.json", "generation_config.json", "model.safetensors",
                               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert card_data(reference).data.license == "apache-2.0"
    assert f'from_pretrained("{REPO_ID}")' in (reference / "README.md").read_text()
    # the temporary export is gone
    assert not up["folder"].exists() and _left_in(tmp_path / "tmp") == []

    # by default: public (for a new repo), main, a message naming the run
    RecordingHfApi.calls = []
    assert main(["push", str(tmp_path / "run"), REPO_ID]) == 0
    calls = dict(RecordingHfApi.calls)
    assert [c[0] for c in RecordingHfApi.calls] == ["init", "create_repo", "upload_folder"]
    assert calls["create_repo"]["private"] is False
    assert (calls["upload_folder"]["revision"], calls["upload_folder"]["commit_message"]) == (None, "cairn push: run")


@pytest.mark.slow
def test_push_without_the_network_ends_in_one_line_and_leaves_nothing(tmp_path, small_tokenizer):
    cfg, model = tiny_model(tokenizer=small_tokenizer)
    run = tmp_path / "run"
    save_run(run, cfg, model)
    before = _tree(run)
    home = tmp_path / "home"
    cases = {
        "offline": {},  # HF_HUB_OFFLINE=1: refused before anything is exported
        # no offline flag, a token, and a hub that refuses connections: exported, then the upload fails
        "unreachable": {"HF_HUB_OFFLINE": None, "HF_TOKEN": "hf_unused", "HF_ENDPOINT": "http://127.0.0.1:9"},
    }
    for name, extra in cases.items():
        p = subprocess.run([sys.executable, "-m", "cairn", "push", str(run), REPO_ID], env=_env(home, **extra),
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 2 and p.stdout == "", (name, p.stdout, p.stderr)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith(
            "error: cairn push uploads to the Hugging Face hub and needs the network"), (name, err)
        assert not [q for q in (home / "tmp").iterdir() if q.name.startswith("cairn-push-")], name
        assert not (home / "hub").exists() and sorted(q.name for q in tmp_path.iterdir()) == ["home", "run"]
    assert _tree(run) == before


def _left_in(tmp: Path) -> list[Path]:
    """What is left in a temporary directory, but torch's compile cache: the first model a process
    builds imports torch._dynamo, which makes TMPDIR/torchinductor_USER whatever cairn does."""
    return [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
