"""Checkpoints: one directory each, written atomically, read without executing code.

Training writes them and loading reads them; neither side imports the other.

A checkpoint directory holds
  model.safetensors  the weights (safetensors: plain tensors, no code can hide in it)
  trainer.pt         optimizer state and torch RNG states, read back with weights_only=True
                     (only for checkpoints that can resume training)
  state.json         step, epoch, position in the epoch, early-stopping state, Python/NumPy RNG,
                     the resolved config, the tokenizer identity, cairn's version

It is written with `files.atomic_dir`: a crash leaves either the old checkpoint or the new one,
never half of one. `checkpoints/latest` names the newest checkpoint that can resume and moves only
after the rename; it is a hint: `newest_resumable` reads the checkpoints themselves.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, cast

import torch
from safetensors import safe_open

from cairn.util import files
from cairn.checkpoint.verify import state_problem
from cairn.util.errors import CairnError

FORMAT = "cairn-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], meta: dict,
                    trainer_state: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    with files.atomic_dir(Path(path)) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta},
                                                   indent=1), encoding="utf-8")
    return path


def set_latest(checkpoint_dir: Path) -> None:
    files.write_text(checkpoint_dir.parent / LATEST, checkpoint_dir.name + "\n")


def latest(checkpoints: Path) -> Optional[Path]:
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None
    target = checkpoints / name
    return target if _own_name(name) and (target / "state.json").is_file() else None


def _own_name(name: str) -> bool:
    """A checkpoint's own name inside checkpoints/: nothing that leads elsewhere."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


RESUMABLE_KINDS = {"step": 0, "epoch": 1, "final": 2}  # at one step, the later kind is the later checkpoint
NOT_RESUMABLE_BEST = "a 'best' checkpoint holds weights only: it cannot resume training"
NOT_RESUMABLE_ENDED_ON_BEST = ("it holds the run's best weights, which the run ended on, not its last state: "
                               "resume from the step checkpoint written beside it")


def resumable_problem(path: Path) -> Optional[str]:
    """Why training cannot resume from `path`, or None when it can: its state.json is whole and
    valid, its weights file has a readable header, its optimizer state is a whole zip file."""
    try:
        meta = read_checkpoint(path).meta
    except CairnError as e:
        return str(e)
    if meta.get("kind") == "best":
        return NOT_RESUMABLE_BEST
    if meta.get("weights_step") is not None:
        return NOT_RESUMABLE_ENDED_ON_BEST
    problem = state_problem(meta) or (None if meta.get("kind") in RESUMABLE_KINDS else
                                      f"kind must be one of {', '.join(RESUMABLE_KINDS)}, got {meta.get('kind')!r}")
    if problem:
        return f"state.json is damaged ({problem})"
    if not (path / "trainer.pt").is_file():
        return "it holds no optimizer state (no trainer.pt)"
    if not zipfile.is_zipfile(path / "trainer.pt"):
        return "trainer.pt is corrupt or truncated (not a torch zip file)"
    try:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        return f"model.safetensors is unreadable ({_first_words(e)})"
    return None


def newest_resumable(checkpoints: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint training can resume from, found by reading the checkpoints
    themselves (the `latest` pointer is only a hint), and those passed over, with why."""
    if not checkpoints.is_dir():
        return None, []
    good, bad = [], []
    for p in sorted(checkpoints.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        problem = resumable_problem(p)
        if problem is None:
            meta = read_checkpoint(p).meta
            good.append((meta["state"]["step"], RESUMABLE_KINDS[meta["kind"]], p == latest(checkpoints), p))
        elif problem not in (NOT_RESUMABLE_BEST, NOT_RESUMABLE_ENDED_ON_BEST):
            bad.append((p, problem))
    return (max(good)[-1] if good else None), bad


@dataclass
class Checkpoint:
    path: Path
    meta: dict

    def model_state(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / "model.safetensors"
        if not f.is_file():
            raise CairnError(f"{f} is missing: the checkpoint is incomplete, use another one")
        try:
            return load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CairnError(f"{f} is corrupt or truncated ({_first_words(e)}): {_use_another(self.path)}") from None

    def trainer_state(self) -> dict:
        f = self.path / "trainer.pt"
        if not f.is_file():
            raise CairnError(f"{self.path} holds no optimizer state, so training cannot resume from it: "
                             "resume from a step or epoch checkpoint")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"pickled code ({found.group(1)})" if found else "pickled objects"
            raise CairnError(f"refusing {f}: it holds {what}, not plain tensors; cairn never runs code from a "
                             "checkpoint: use a checkpoint written by cairn") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
            raise CairnError(f"{f} is corrupt or truncated ({_first_words(e)}): {_use_another(self.path)}") from None


def _use_another(bad: Path) -> str:
    """Advice after a damaged checkpoint: the newest good one of its run, by name."""
    if bad.parent.name == "checkpoints":
        found, _ = newest_resumable(bad.parent)
        if found is not None and found != bad:
            return f"use another checkpoint, e.g. {found} (`cairn train --resume {bad.parent.parent}` resumes from it)"
    return "use another checkpoint"


def _first_words(e: BaseException, limit: int = 100) -> str:
    """The first line of an error, cut at a word boundary, printable only."""
    text = "".join(ch for ch in str(e).splitlines()[0] if ch.isprintable()) if str(e) else type(e).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CairnError(f"checkpoint {str(path)!r} does not exist: pass a run directory or a checkpoint directory")
    state = path / "state.json"
    if not path.is_dir() or not state.is_file():
        raise CairnError(f"{str(path)!r} is not a cairn checkpoint (no state.json): "
                         "pass a run directory or one of its checkpoints/ entries")
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CairnError(f"{state} is corrupt (not JSON): use another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CairnError(f"{str(path)!r} is not a cairn checkpoint (state.json lacks format={FORMAT!r}): pass a run "
                         "directory written by cairn train or one of its checkpoints/ entries")
    if not isinstance(meta.get("format_version", 0), int):
        raise CairnError(f"{state} is corrupt (format_version is not a number): use another checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CairnError(f"{str(path)!r} was written by a newer cairn (format {meta['format_version']}): upgrade cairn")
    return Checkpoint(path, meta)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory as given, or for a run directory its final checkpoint (else the
    newest resumable one)."""
    p = Path(path)
    if not p.exists():
        raise CairnError(f"{str(p)!r} does not exist: pass a run directory or a checkpoint directory")
    if (p / "state.json").is_file():
        return p
    ckpts = p / "checkpoints"
    if ckpts.is_dir():
        finals = sorted(ckpts.glob("*_final"))
        if finals and (finals[0] / "state.json").is_file():
            return finals[0]
        newest = latest(ckpts)
        if newest is not None:
            return newest
    raise CairnError(f"{str(p)!r} holds no cairn checkpoint: pass a run directory written by `cairn train` "
                     "or a checkpoint directory")


def prune(checkpoints: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (never the one `latest` names)."""
    if keep <= 0:
        return
    steps = sorted(checkpoints.glob(f"{prefix}_checkpoint_step*"))
    current = latest(checkpoints)
    for old in steps[:-keep]:
        if current is None or old.resolve() != current.resolve():
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    py = random.getstate()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
