"""Bad input, table-driven: every case exits with code 2 and ONE line `error: <what is wrong>: <what to do>`.

For every case we also check that no traceback is printed and that nothing is left half-written:
the case's whole temporary folder (its inputs, and any run directory or checkpoint it was given) is
byte-identical afterwards, no `.tmp-` folder is left in the token cache, the module's good run is
untouched, and a pickle payload planted in a checkpoint never runs.

Most cases call `cairn.cli.main([...])` in-process (a subprocess costs ~3 s of imports); the cases
marked `sub=True` run `python -m cairn` for real. A few cases call the library directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from cairn.cli import main
from cairn.util.errors import CairnError

# "what to do": every message names an action (or, for a plain constraint, what the value must be)
HINT = re.compile(r"\b(use|pass|give|set|check|choose|add|lower|raise|drop|resume|start|convert|put|fix|save|"
                  r"change|leave|ask|see|delete|remove|upgrade|free|must|run|evaluate)\b", re.I)


def _says_what_to_do(message: str) -> bool:
    # paths and quoted names are not advice (a tmp path holding "/run/" must not count)
    words = re.sub(r"\S*[/\\]\S*|'[^']*'", " ", message)
    return bool(HINT.search(words))


class Unsafe(Exception):
    """A safety failure (payload ran, files changed): never hidden by an xfail, which only covers AssertionError."""


# ---------------------------------------------------------------- module fixtures: data and one good run

def _stories(n: int) -> list[str]:
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue", "Max", "Amy"]
    things = ["a red ball", "a big box", "a small cat", "a blue kite", "a green frog", "a warm hat"]
    places = ["the park", "the garden", "the beach", "the house", "the forest"]
    return [f"{names[i % 8]} found {things[i % 6]} in {places[i % 5]}. {names[i % 8]} showed it to "
            f"{names[(3 * i + 1) % 8]}. They played until dark and were happy. The end." for i in range(n)]


def _write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cairn-cache"  # the folder conftest points CAIRN_CACHE at


@dataclass
class World:
    base: Path
    data: Path  # ~300 short stories
    run: Path  # the shared finished tiny run (conftest's trained_run), with step, best and final checkpoints
    final: Path
    cache: Path
    tokenizer: Path  # the shared small tokenizer (the run's), for the cases that get as far as training
    run_stat: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run) -> World:
    base = tmp_path_factory.mktemp("bad_input")
    data = _write_jsonl(base / "stories.jsonl", _stories(300))
    run = trained_run.run  # cases work on hard-linked copies of it (Ctx.run, Ctx.ckpt): it never changes
    final = next((run / "checkpoints").glob("*_final"))
    assert (final / "trainer.pt").is_file() and (final / "model.safetensors").is_file()
    assert list((run / "checkpoints").glob("*_checkpoint_step*")) and list((run / "checkpoints").glob("*_best"))
    return World(base, data, run, final, _cache_root(tmp_path_factory), trained_run.tokenizer, _stat_snapshot(run))


# ---------------------------------------------------------------- snapshots

def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes ('dir' for folders): byte-level identity."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            try:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                out[rel] = h.hexdigest()
            except OSError:  # the unreadable-file case (not as root)
                out[rel] = f"unreadable:{os.lstat(p).st_size}:{os.lstat(p).st_mtime_ns}"
    return out


def _stat_snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added}, removed {removed}, changed {changed}"


# ---------------------------------------------------------------- building bad input

def _replace(path: Path, data: bytes) -> None:
    """Write new content as a new file, so a hard-linked copy never changes the original."""
    path.unlink()
    path.write_bytes(data)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    _replace(path, data[: int(len(data) * keep)])


def _edit_state(ckpt: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((ckpt / "state.json").read_text())
    edit(meta)
    _replace(ckpt / "state.json", json.dumps(meta).encode())


class _Payload:
    """Unpickled with full pickle, this runs `touch MARKER`, through os.system (a module torch blocks
    outright) or subprocess.call (a global torch merely does not allow): both refusal paths of torch."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
        return (subprocess.call, (["touch", str(self.marker)],))


def _payload(marker: Path, via: str = "os.system") -> bytes:
    return pickle.dumps(_Payload(marker, via), protocol=2)


def _zip_with_payload(trainer_pt: Path, payload: bytes) -> bytes:
    """A real torch zip checkpoint whose data.pkl is replaced by the payload."""
    buf = io.BytesIO()
    with zipfile.ZipFile(trainer_pt) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        names = [i.filename for i in zin.infolist()]
        assert any(n.endswith("/data.pkl") for n in names), names
        for name in names:
            zout.writestr(name, payload if name.endswith("/data.pkl") else zin.read(name))
    return buf.getvalue()


class Ctx:
    """What a case builds its input in: its own tmp folder, plus the module's data and run."""

    def __init__(self, tmp: Path, w: World):
        self.tmp, self.w = tmp, w
        self.out = tmp / "out"  # a run directory that must still not exist afterwards
        self.marker = tmp / "PAYLOAD_RAN"
        self._run: Optional[Path] = None

    def train(self, *args, preset: bool = True, data: bool = True) -> list:
        return (["train"] + (["--preset", "tiny"] if preset else []) + (["--data", self.w.data] if data else [])
                + ["--out", self.out, "--max-steps", "2", "--no-progress", *args])

    def file(self, name: str, content) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    def jsonl(self, name: str, lines: list) -> Path:
        return self.file(name, "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))

    def folder(self, name: str, files: dict[str, str]) -> Path:
        d = self.tmp / name
        d.mkdir()
        for k, v in files.items():
            (d / k).write_text(v)
        return d

    def run(self) -> Path:
        """A copy of the good run (hard links: corrupt files only through _replace/_truncate)."""
        if self._run is None:
            self._run = self.tmp / "run"
            shutil.copytree(self.w.run, self._run, copy_function=os.link)
        return self._run

    def final(self) -> Path:
        return next((self.run() / "checkpoints").glob("*_final"))

    def ckpt(self) -> Path:
        """A copy of the good final checkpoint directory alone."""
        d = self.tmp / "ckpt"
        if not d.exists():
            shutil.copytree(self.w.final, d, copy_function=os.link)
        return d

    def trainer_files(self) -> list[Path]:
        files = sorted(self.run().glob("checkpoints/*/trainer.pt"))
        assert files
        return files


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    build: Callable[[Ctx], list]  # returns argv (after `cairn`); may create input files in ctx.tmp
    expect: str  # regex the error line must match (what is wrong)
    sub: bool = False  # run `python -m cairn` in a subprocess
    env: dict = field(default_factory=dict)  # env changes (None = unset)
    max_s: float = 0.0  # must fail within this many seconds
    payload: bool = False  # a pickle payload is planted: its marker must never appear


def C(id: str, build, expect: str, *, marks=(), **kw):
    case = Case(build, expect, **kw)
    marks = (marks,) if isinstance(marks, pytest.MarkDecorator) else tuple(marks)
    if case.sub:  # a process's start and imports take seconds
        marks += (pytest.mark.slow,)
    return pytest.param(case, id=id, marks=marks)


def _unreadable(c: Ctx) -> list:
    f = _write_jsonl(c.tmp / "locked.jsonl", _stories(300))
    f.chmod(0)
    return c.train("--data", f)


def _config(text) -> Callable[[Ctx], list]:
    return lambda c: c.train("--config", c.file("cfg.toml", text))


def _pickle_legacy(c: Ctx) -> list:
    for f in c.trainer_files():
        _replace(f, _payload(c.marker))
    return ["train", "--resume", c.run(), "--no-progress"]


def _pickle_zip(c: Ctx) -> list:
    for f in c.trainer_files():
        _replace(f, _zip_with_payload(f, _payload(c.marker, "subprocess.call")))
    return ["train", "--resume", c.run(), "--no-progress"]


def _resume_after(corrupt: Callable[[Path], None], *extra) -> Callable[[Ctx], list]:
    """Every checkpoint training could resume from is damaged alike (with one good one left, a
    resume uses it: see test_faults.py)."""
    def build(c: Ctx) -> list:
        for f in c.trainer_files():
            corrupt(f.parent)
        return ["train", "--resume", c.run(), "--no-progress", *extra]
    return build


def _eval_after(corrupt: Callable[[Path], None], command: str = "eval", *extra) -> Callable[[Ctx], list]:
    def build(c: Ctx) -> list:
        corrupt(c.ckpt())
        args = [command, c.ckpt(), *extra]
        return args + (["--prompt", "Once upon a time", "--max-new-tokens", "3"] if command == "generate" else [])
    return build


def _gen(*args) -> Callable[[Ctx], list]:
    return lambda c: ["generate", c.w.final, *args]


OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": None, "ALL_PROXY": None, "all_proxy": None,
           "HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None}  # port 9: connection refused at once

CASES = [
    # ---- data sources
    C("data-path-missing", lambda c: c.train("--data", c.tmp / "nope.jsonl"),
      r"data path .*nope\.jsonl.* does not exist",
      sub=True),
    C("data-dir-without-data-files", lambda c: c.train("--data", c.folder("notes", {"a.md": "hi", "b.csv": "x,y"})),
      r"holds no data files"),
    C("data-unreadable-file", _unreadable, r"cannot read data file .*locked\.jsonl",
      marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files")),
    C("data-jsonl-invalid-utf8",
      lambda c: c.train("--data", c.file("bad.jsonl", b'{"text": "A fine story."}\n{"text": "caf\xe9"}\n')),
      r"bad\.jsonl:2: not valid UTF-8"),
    C("data-txt-invalid-utf8",
      lambda c: c.train("--data", c.file("bad.txt", b"One story.\n<|endoftext|>\nAnother \xff\xfe story.\n")),
      r"bad\.txt:3: not valid UTF-8"),
    C("data-jsonl-line-not-json", lambda c: c.train("--data", c.jsonl("s.jsonl", [{"text": "ok"}, "{text: oops}"])),
      r"s\.jsonl:2: not valid JSON"),
    C("data-jsonl-line-lacks-text-field",
      lambda c: c.train("--data", c.jsonl("s.jsonl", [{"text": "ok"}, {"story": "no text field"}])),
      r"s\.jsonl:2: no field 'text'.*--text-field"),
    C("data-jsonl-line-not-an-object", lambda c: c.train("--data", c.jsonl("s.jsonl", ["[1, 2, 3]"])),
      r"s\.jsonl:1: no field 'text'"),
    C("data-jsonl-text-not-a-string", lambda c: c.train("--data", c.jsonl("s.jsonl", [{"text": 5}])),
      r"s\.jsonl:1: field 'text' is a int, not text"),
    C("data-jsonl-nested-too-deep", lambda c: c.train("--data", c.jsonl("s.jsonl", ["[" * 100_000 + "]" * 100_000])),
      r"s\.jsonl:1: JSON nested too deeply"),
    C("data-jsonl-every-story-empty",
      lambda c: c.train("--data", c.jsonl("s.jsonl", [{"text": ""}, {"text": "  \n\t "}, {"text": None}])),
      r"no text left .* after dropping empty stories"),
    C("data-txt-every-story-empty",
      lambda c: c.train("--data", c.file("s.txt", "\n   \n<|endoftext|>\n\t\n<|endoftext|>\n")),
      r"no text left"),
    C("data-too-few-stories-for-split", lambda c: c.train("--data", _write_jsonl(c.tmp / "two.jsonl", _stories(2))),
      r"too few stories \(2\) for the split"),
    C("data-too-few-tokens-for-one-batch",
      lambda c: c.train("--data", _write_jsonl(c.tmp / "twenty.jsonl", _stories(20)), "--seq-len", "4096",
                        "--context-len", "4096"),
      r"train split has 0 windows of up to 4096 tokens, too few for one step: lower --seq-len"),
    C("data-unknown-extension", lambda c: c.train("--data", c.file("stories.csv", "text\nhello\n")),
      r"unknown type"),
    C("data-glob-matches-nothing", lambda c: c.train("--data", f"{c.tmp}/nothing-*.jsonl"),
      r"no data files match"),
    C("data-parquet-corrupt", lambda c: c.train("--data", c.file("s.parquet", b"PAR1 this is not parquet")),
      r"not a readable parquet file"),
    C("data-empty-string", lambda c: c.train("--data", ""), r"--data is empty"),
    C("hub-dataset-offline", lambda c: c.train("--data", "someone/no-such-stories"),
      r"cannot load hub dataset 'someone/no-such-stories' \(no network\?\): pass local files with --data PATH",
      env=OFFLINE, max_s=8),
    C("hub-default-dataset-offline", lambda c: c.train(data=False),
      r"cannot load hub dataset 'roneneldan/TinyStories'.*pass local files with --data PATH", env=OFFLINE, max_s=8),
    C("hub-dataset-hf-offline-subprocess", lambda c: c.train("--data", "someone/no-such-stories"),
      r"hub dataset 'someone/no-such-stories'.*pass local files with --data PATH", sub=True, max_s=30,
      env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
    # ---- config files
    C("config-missing", lambda c: c.train("--config", c.tmp / "nope.toml"),
      r"config file .*nope\.toml.* does not exist"),
    C("config-is-a-directory", lambda c: c.train("--config", c.folder("cfgdir", {})), r"is a directory"),
    C("config-not-toml", _config("this is = = not toml\n[unclosed\n"), r"is not valid TOML"),
    C("config-not-utf8", _config(b"[train]\nlr = 1e-3 # caf\xe9\n"), r"is not UTF-8"),
    C("config-wrong-type", _config('[train]\nlr = "fast"\n'), r"schedule\.lr must be a float, got 'fast'"),
    C("config-int-not-whole", _config("[model]\nd_model = 64.5\n"), r"model\.d_model must be an int"),
    C("config-unknown-key", _config("[train]\nlearning_rate = 0.1\n"), r"unknown key train\.learning_rate"),
    C("config-unknown-section", _config("[optimizer]\nlr = 0.1\n"), r"unknown section \[optimizer\]"),
    C("config-unknown-top-level-key", _config("colour = 'blue'\n"), r"unknown top-level key 'colour'"),
    C("config-section-not-a-table", _config("train = 5\n"), r"\[train\] must be a table"),
    C("config-invalid-value", _config("[train]\nbatch_size = 0\n"), r"train\.batch_size must be positive"),
    C("config-unknown-preset-in-file",
      lambda c: c.train("--config", c.file("cfg.toml", 'preset = "huge"\n'), preset=False),
      r"config file .*unknown preset 'huge'"),
    C("config-empty-string", lambda c: c.train("--config", ""), r"--config is empty"),
    # ---- presets and options
    C("unknown-command", lambda c: ["frobnicate"], r"invalid choice: 'frobnicate'"),
    C("unknown-preset", lambda c: ["train", "--preset", "huge", "--out", c.out], r"unknown preset 'huge'"),
    C("preset-empty-string", lambda c: c.train("--preset", ""), r"--preset is empty"),
    C("unknown-option", lambda c: c.train("--nope", "1"), r"unknown option 'nope'", sub=True),
    C("stray-argument", lambda c: c.train("stray"), r"unexpected argument 'stray'"),
    C("option-wrong-type", lambda c: c.train("--batch-size", "two"), r"batch-size must be an int, got 'two'"),
    C("option-int-not-whole", lambda c: c.train("--batch-size", "1.5"), r"batch-size must be an int, got '1.5'"),
    C("max-steps-not-int", lambda c: c.train("--max-steps", "many"), r"--max-steps: invalid int value: 'many'"),
    C("batch-size-zero", lambda c: c.train("--batch-size", "0"), r"train\.batch_size must be positive, got 0"),
    C("lr-negative", lambda c: c.train("--lr", "-1"), r"schedule\.lr must be positive, got -1"),
    C("lr-nan", lambda c: c.train("--lr", "nan"), r"lr must be a float, got 'nan'"),
    C("d-model-zero", lambda c: c.train("--d-model", "0"), r"model\.d_model must be positive, got 0"),
    C("epochs-zero", lambda c: c.train("--epochs", "0"), r"train\.epochs must be positive, got 0"),
    C("max-steps-negative", lambda c: c.train("--max-steps", "-1"), r"train\.max_steps must be zero or more"),
    C("width-not-divisible-by-heads", lambda c: c.train("--d-model", "66"), r"d_model \(66\) must be divisible"),
    C("positions-unknown", lambda c: c.train("--positions", "alibi"),
      r"model\.positions must be 'sinusoidal' or 'rope'"),
    C("norm-unknown", lambda c: c.train("--norm", "batchnorm"), r"model\.norm must be 'layernorm' or 'rmsnorm'"),
    C("mlp-unknown", lambda c: c.train("--mlp", "relu"), r"model\.mlp must be 'gelu' or 'swiglu'"),
    C("rope-theta-zero", lambda c: c.train("--rope-theta", "0"), r"model\.rope_theta must be positive"),
    C("time-budget-not-a-duration", lambda c: c.train("--time-budget", "soon"),
      r"time_budget 'soon' is not a duration"),
    # (without --max-steps: a run given a step count takes at least one step whatever the budget)
    C("time-budget-too-short", lambda c: ["train", "--preset", "tiny", "--data", c.w.data, "--out", c.out,
                                          "--no-progress", "--time-budget", "0.2s", "--tokenizer", c.w.tokenizer],
      r"time budget of 0s is too short"),
    C("tokenizer-bpe-too-small", lambda c: c.train("--tokenizer", "bpe:12"), r"must be bpe:N with N from 257"),
    C("seq-len-over-context", lambda c: c.train("--seq-len", "256"), r"seq_len \(256\) is longer than .*context_len"),
    C("fractions-over-one", lambda c: c.train("--train-frac", "0.9", "--val-frac", "0.2"), r"is over 1"),
    C("unknown-batching", lambda c: c.train("--batching", "bucket"), r"batching must be 'pack' or 'pad'"),
    C("unknown-schedule", lambda c: c.train("--schedule", "step"), r"schedule must be 'linear', 'cosine'"),
    C("unknown-precision", lambda c: c.train("--precision", "fp16"), r"precision must be 'auto', 'fp32' or 'bf16'"),
    C("seed-negative", lambda c: c.train("--seed", "-1"), r"seed must be zero or more"),
    C("stop-after-negative", lambda c: c.train("--stop-after", "-1"), r"--stop-after must be zero"),
    C("name-with-path-separator", lambda c: c.train("--name", "../escape"), r"cannot name checkpoint files"),
    C("unknown-device", lambda c: c.train("--device", "tpu9"), r"unknown device 'tpu9'"),
    C("out-is-a-file", lambda c: c.train("--out", c.file("taken.txt", "keep me\n")), r"is a file, not a directory"),
    C("out-under-a-file", lambda c: c.train("--out", c.file("taken.txt", "keep me\n") / "run"), r"is a file"),
    C("out-empty-string", lambda c: c.train("--out", ""), r"--out is empty"),
    C("out-already-holds-a-run", lambda c: c.train("--out", c.run()), r"already holds a run: resume it with --resume"),
    # ---- resume
    C("resume-not-a-run", lambda c: ["train", "--resume", c.folder("notrun", {"x.txt": "hi"})],
      r"is not a cairn run directory"),
    C("resume-missing-path", lambda c: ["train", "--resume", c.tmp / "nope"], r"is not a cairn run directory"),
    C("resume-empty-string", lambda c: ["train", "--resume", ""], r"--resume is empty"),
    C("resume-with-preset", lambda c: ["train", "--resume", c.run(), "--preset", "tiny"], r"drop --preset"),
    C("resume-with-other-out", lambda c: ["train", "--resume", c.run(), "--out", c.out], r"different directories"),
    C("resume-architecture-differs", lambda c: ["train", "--resume", c.run(), "--d-model", "32", "--no-progress"],
      r"model config differs: model\.d_model \(64 -> 32\)"),
    # a trainer.pt that is not a torch zip file is never unpickled: it is passed over as corrupt
    C("resume-pickle-payload-legacy", _pickle_legacy, r"no checkpoint that can resume \(trainer\.pt is corrupt",
      sub=True, payload=True),
    C("resume-pickle-payload-zip", _pickle_zip, r"refusing .*trainer\.pt", payload=True),
    C("resume-trainer-state-truncated", _resume_after(lambda p: _truncate(p / "trainer.pt")),
      r"trainer\.pt is corrupt or truncated"),
    C("resume-trainer-state-missing", _resume_after(lambda p: (p / "trainer.pt").unlink()),
      r"holds no optimizer state"),
    C("resume-state-json-not-json", _resume_after(lambda p: _replace(p / "state.json", b"{not json")),
      r"state\.json is corrupt \(not JSON\)"),
    C("resume-state-json-without-config",
      _resume_after(lambda p: _replace(p / "state.json", b'{"format": "cairn-checkpoint", "format_version": 1}')),
      r"state\.json"),
    # ---- eval / generate on bad paths and checkpoints
    C("eval-path-missing", lambda c: ["eval", c.tmp / "nope"], r"does not exist: pass a run directory"),
    C("eval-dir-not-a-run", lambda c: ["eval", c.folder("notrun", {"x.txt": "hi"})], r"holds no cairn checkpoint"),
    C("eval-state-json-not-json", _eval_after(lambda p: _replace(p / "state.json", b"{not json")),
      r"state\.json is corrupt \(not JSON\)"),
    C("eval-state-json-foreign", _eval_after(lambda p: _replace(p / "state.json", b'{"step": 3}')),
      r"is not a cairn checkpoint"),
    C("eval-state-json-config-not-a-table", _eval_after(lambda p: _edit_state(p, lambda m: m.update(config=5))),
      r"holds no valid config"),
    C("eval-state-json-newer-format",
      _eval_after(lambda p: _edit_state(p, lambda m: m.update(format_version=99))), r"newer cairn"),
    C("eval-weights-do-not-fit-config",
      _eval_after(lambda p: _edit_state(p, lambda m: m["config"]["model"].update(d_mlp=128))),
      r"weights do not fit the saved model config"),
    C("eval-safetensors-truncated", _eval_after(lambda p: _truncate(p / "model.safetensors")),
      r"model\.safetensors is corrupt or truncated"),
    C("eval-safetensors-empty", _eval_after(lambda p: _replace(p / "model.safetensors", b"")),
      r"model\.safetensors is corrupt or truncated"),
    C("eval-safetensors-missing", _eval_after(lambda p: (p / "model.safetensors").unlink()),
      r"model\.safetensors is missing"),
    C("generate-safetensors-truncated", _eval_after(lambda p: _truncate(p / "model.safetensors", 0.3), "generate"),
      r"model\.safetensors is corrupt or truncated", sub=True),
    C("eval-run-data-gone",
      _eval_after(lambda p: _edit_state(p, lambda m: m["config"]["data"].update(source=str(p.parent / "gone.jsonl")))),
      r"gone\.jsonl.* does not exist"),
    C("eval-data-every-story-empty", lambda c: ["eval", c.w.final, "--data", c.jsonl("e.jsonl", [{"text": " "}])],
      r"no text left"),
    C("eval-data-empty-string", lambda c: ["eval", c.w.final, "--data", ""], r"--data is empty"),
    C("eval-batch-size-negative", lambda c: ["eval", c.w.final, "--batch-size", "-1"],
      r"--batch-size must be positive"),
    C("eval-unknown-split", lambda c: ["eval", c.w.final, "--split", "training"],
      r"--split: invalid choice: 'training'"),
    C("eval-unknown-option", lambda c: ["eval", c.w.final, "--nope"], r"unknown option '--nope' for `cairn eval`"),
    C("generate-path-missing", lambda c: ["generate", c.tmp / "nope", "--prompt", "Hi"], r"does not exist"),
    C("generate-dir-not-a-run", lambda c: ["generate", c.folder("notrun", {}), "--prompt", "Hi"],
      r"holds no cairn checkpoint"),
    C("generate-no-prompt", _gen(), r"one of the arguments --prompt --prompt-file is required"),
    C("generate-empty-prompt", _gen("--prompt", ""), r"--prompt is empty"),
    C("generate-whitespace-prompt", _gen("--prompt", " \n\t "), r"--prompt is empty"),
    C("generate-prompt-not-utf8", _gen("--prompt", "Once \udcff\udcfe"), r"--prompt is not valid UTF-8"),
    C("generate-top-p-zero", _gen("--prompt", "Hi", "--top-p", "0"), r"--top-p must be in \(0, 1\]"),
    C("generate-top-p-nan", _gen("--prompt", "Hi", "--top-p", "nan"), r"--top-p must be in \(0, 1\]"),
    C("generate-temperature-negative", _gen("--prompt", "Hi", "--temperature", "-1"), r"--temperature must be"),
    C("generate-temperature-nan", _gen("--prompt", "Hi", "--temperature", "nan"), r"--temperature must be"),
    C("generate-top-k-negative", _gen("--prompt", "Hi", "--top-k", "-5"), r"--top-k must be zero"),
    C("generate-max-new-tokens-zero", _gen("--prompt", "Hi", "--max-new-tokens", "0"),
      r"--max-new-tokens must be positive"),
    C("generate-max-new-tokens-not-int", _gen("--prompt", "Hi", "--max-new-tokens", "lots"),
      r"--max-new-tokens: invalid int value"),
]

def _check_no_leftovers(w: World, ctx: Ctx, before: dict) -> None:
    after = _snapshot(ctx.tmp)
    if after != before:
        raise Unsafe(f"files changed in the case folder: {_diff(before, after)}")
    if ctx.out.exists():
        raise Unsafe(f"{ctx.out} was created")
    tmps = list((w.cache / "tokens").glob(".tmp-*")) if (w.cache / "tokens").is_dir() else []
    if tmps:
        raise Unsafe(f"half-written token cache left behind: {tmps}")
    if _stat_snapshot(w.run) != w.run_stat:
        raise Unsafe("the module's good run changed")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_clean_line(case: Case, world: World, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, world)
    argv = [str(a) for a in case.build(ctx)]
    before = _snapshot(tmp_path)
    start = time.monotonic()
    if case.sub:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k, v in case.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env.setdefault("HF_HOME", str(world.base / "hf-home"))  # never the user's cache; outside the case folder
        r = subprocess.run([sys.executable, "-m", "cairn", *argv], capture_output=True, env=env, cwd=tmp_path,
                           timeout=120)
        rc, out, err = r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    else:
        for k, v in case.env.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        monkeypatch.chdir(tmp_path)  # anything written to a relative default lands in the snapshot
        try:
            rc = main(argv)
        except BaseException as e:  # noqa: BLE001 - main must turn every bad input into a return code
            out, err = capsys.readouterr()
            raise AssertionError(f"cairn.cli.main raised {type(e).__name__}: {e}\nstderr: {err}") from e
        out, err = capsys.readouterr()
    elapsed = time.monotonic() - start

    # safety first: these are never excused by an xfail (which only covers AssertionError)
    if case.payload and ctx.marker.exists():
        raise Unsafe("the pickle payload in trainer.pt ran")
    _check_no_leftovers(world, ctx, before)

    assert "Traceback" not in out + err, f"traceback printed:\n{out}\n{err}"
    assert rc == 2, f"exit code {rc}, expected 2\nstdout: {out}\nstderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"stderr must be exactly one line, got {err!r}"
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    assert line.isprintable(), f"control characters in the error line: {line!r}"
    assert re.search(case.expect, line), f"{line!r} does not match {case.expect!r}"
    assert _says_what_to_do(line[len("error: "):]), f"the message does not say what to do: {line!r}"
    if case.max_s:
        assert elapsed < case.max_s, f"took {elapsed:.1f}s, must fail within {case.max_s}s"


def test_the_table_covers_enough_kinds_of_bad_input():
    assert len(CASES) >= 24
    assert len({p.id for p in CASES}) == len(CASES)
    assert sum(p.values[0].sub for p in CASES) >= 4


@pytest.mark.parametrize("via", ["os.system", "subprocess.call"])
def test_the_planted_payload_is_live(tmp_path, via):
    """Guard for the pickle cases: the payload really runs code when unpickled with full pickle."""
    marker = tmp_path / "ran"
    pickle.loads(_payload(marker, via))
    assert marker.exists()


# ---------------------------------------------------------------- the library
# Each entry builds its input (before the snapshot) and returns the call that must raise CairnError.

def _lib_train_zero_batch(c: Ctx):
    import cairn
    from cairn.config.io import apply_overrides

    cfg = apply_overrides(cairn.preset("tiny"), {"batch_size": 0, "source": str(c.w.data)})
    return lambda: cairn.train(cfg, c.out)


def _lib_generate_top_p_zero(c: Ctx):
    import cairn
    from cairn.inference.generate import SamplingConfig, generate_text

    loaded = cairn.load(c.w.final, "cpu")
    return lambda: generate_text(loaded.model, loaded.tokenizer, "Once upon a time", SamplingConfig(top_p=0.0))


def _lib_load_truncated(c: Ctx):
    import cairn

    _truncate(c.ckpt() / "model.safetensors")
    return lambda: cairn.load(c.ckpt(), "cpu")


def _lib_load_texts_bad_utf8(c: Ctx):
    from cairn.data import load_texts

    f = c.file("bad.jsonl", b'{"text": "caf\xe9"}\n')
    return lambda: load_texts(str(f))


def _lib_load_toml_unknown_section(c: Ctx):
    from cairn.config.io import load_toml

    f = c.file("c.toml", "[optimizer]\nlr = 1\n")
    return lambda: load_toml(f)


def _lib_preset_unknown(c: Ctx):
    import cairn

    return lambda: cairn.preset("huge")


def _lib_validate_seed(c: Ctx):
    from cairn.config.sections import RunConfig, validate

    cfg = RunConfig()
    cfg.seed = -3
    return lambda: validate(cfg)


LIB_CASES = [
    pytest.param(_lib_train_zero_batch, r"train\.batch_size must be positive", id="train-batch-size-zero"),
    pytest.param(_lib_generate_top_p_zero, r"top_p must be in \(0, 1\]", id="generate-top-p-zero"),
    pytest.param(_lib_load_truncated, r"model\.safetensors is corrupt or truncated", id="load-truncated-weights"),
    pytest.param(_lib_load_texts_bad_utf8, r"bad\.jsonl:1: not valid UTF-8", id="load-texts-invalid-utf8"),
    pytest.param(_lib_load_toml_unknown_section, r"unknown section \[optimizer\]", id="load-toml-unknown-section"),
    pytest.param(_lib_preset_unknown, r"unknown preset 'huge'", id="preset-unknown"),
    pytest.param(_lib_validate_seed, r"seed must be zero or more", id="validate-negative-seed"),
]


@pytest.mark.parametrize("build,expect", LIB_CASES)
def test_library_raises_cairn_error(build, expect, world: World, tmp_path):
    ctx = Ctx(tmp_path, world)
    call = build(ctx)
    before = _snapshot(tmp_path)
    with pytest.raises(CairnError) as info:
        call()
    _check_no_leftovers(world, ctx, before)
    msg = str(info.value)
    assert msg and "\n" not in msg and msg.strip() == msg, repr(msg)
    assert re.search(expect, msg), f"{msg!r} does not match {expect!r}"
    assert _says_what_to_do(msg), f"the message does not say what to do: {msg!r}"
