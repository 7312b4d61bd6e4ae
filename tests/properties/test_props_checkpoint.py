"""Generated damage to a checkpoint directory (a copy of the shared run's final one): a file cut short
at a drawn length, a drawn bit flipped, a file removed or replaced by drawn bytes, a weight of the
wrong shape, state.json edited into other JSON. `cairn generate`, `cairn eval` and `cairn.load` then
either work (a flipped bit in a weight is still a model) or refuse in one line, changing nothing; so
does `cairn train --resume` on a copy of the whole run with one of its checkpoints damaged, up to the
first training step (it may resume from an older checkpoint)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cairn.util.errors import CairnError  # noqa: E402
from props_harness import Reached, assert_clean, cli, count, snapshot  # noqa: E402

FILES = ["model.safetensors", "state.json", "trainer.pt"]
Damage = Callable[[Path], None]


@st.composite
def damage(draw: st.DrawFn) -> Damage:
    pick = draw(st.integers(0, len(FILES) - 1))
    kind = draw(st.sampled_from(["truncate", "flip", "remove", "replace", "shape", "json"]))
    at = draw(st.floats(0, 1, exclude_max=True))
    bit = draw(st.integers(0, 7))
    junk = draw(st.binary(max_size=64))
    edit = draw(st.recursive(st.one_of(st.none(), st.integers(-2**70, 2**70), st.text(max_size=8), st.floats()),
                             lambda inner: st.lists(inner, max_size=3), max_leaves=4))

    def apply(ckpt: Path) -> None:
        present = [name for name in FILES if (ckpt / name).is_file()]  # a best checkpoint has no trainer.pt
        path = ckpt / present[pick % len(present)]
        raw = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(raw[:int(at * len(raw))])
        elif kind == "flip":
            i = int(at * len(raw))
            path.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:])
        elif kind == "remove":
            path.unlink()
        elif kind == "replace":
            path.write_bytes(junk)
        elif kind == "shape":
            from safetensors.torch import load_file, save_file

            weights = load_file(str(ckpt / "model.safetensors"))
            key = sorted(weights)[int(at * len(weights))]
            weights[key] = weights[key].flatten()[: max(1, weights[key].numel() // 2)].clone()
            save_file(weights, str(ckpt / "model.safetensors"))
        else:
            state: dict[str, Any] = json.loads((ckpt / "state.json").read_text())
            keys = sorted(state)
            state[keys[int(at * len(keys))]] = edit
            (ckpt / "state.json").write_text(json.dumps(state))
    return apply


@given(damaged=damage(), command=st.sampled_from(["generate", "generate", "generate", "eval"]))
def test_a_damaged_checkpoint_loads_or_is_refused_in_one_line(tmp_path, trained_run, damaged, command):
    from cairn import load

    count("checkpoint: damaged directory")
    final = next((trained_run.run / "checkpoints").glob("*_final"))
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        ckpt = Path(d) / "ckpt"
        shutil.copytree(final, ckpt)
        damaged(ckpt)
        before = snapshot(Path(d))
        argv = (["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "2", "--device", "cpu"]
                if command == "generate" else ["eval", str(ckpt), "--device", "cpu", "--json"])
        assert_clean(cli(argv), before, snapshot(Path(d)))
        try:
            load(str(ckpt), "cpu")
        except CairnError as e:
            assert str(e).strip() and "\n" not in str(e)
        assert not [p for p in snapshot(Path(d)) if p not in before]


@settings(max_examples=max(3, settings().max_examples // 5))  # a resume builds the whole trainer (~1 s)
@given(damaged=damage(), which=st.integers(0, 10))
def test_resume_from_a_damaged_checkpoint_resumes_or_is_refused_in_one_line(tmp_path, trained_run, monkeypatch,
                                                                           damaged, which):
    def first_step(self: object) -> None:
        raise Reached

    monkeypatch.setattr("cairn.training.loop.Trainer.run", first_step)
    count("checkpoint: cairn train --resume")
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        run = Path(d) / "run"
        shutil.copytree(trained_run.run, run)
        checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
        damaged(checkpoints[which % len(checkpoints)])
        before = snapshot(Path(d))
        o = cli(["train", "--resume", str(run), "--no-progress", "--device", "cpu"])
        assert_clean(o, before, snapshot(Path(d)))
