"""`cairn eval RUN --harness TASKS`: lm-evaluation-harness on a cairn run.

The run's model scores through `CairnLM` (harness_lm.py says why not HFLM over an export). The
story tasks (`cairn_story_ppl`, `cairn_story_ending`, both as `cairn_stories`) are built from the
stories `cairn eval` would score (the run's test split, or --data) in a temporary folder that
lm-eval indexes alone; any other name is lm-eval's own task, passed through (lm-eval's index of
its thousands of task files, slower to build than a small run's story tasks, is built only then)."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from cairn.eval.story_tasks import LOCAL_TASKS, TAG
from cairn.util.errors import CairnError

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    from cairn.checkpoint.load import Loaded

INSTALL_HINT = "pip install 'cairn-lm[harness]'"
# lm-eval's bootstrap for the standard error of metrics with no closed form (a median, a corpus
# BLEU): its default of 100,000 resamples takes minutes on a few cores; accuracies need none
BOOTSTRAP_ITERS = 1000
NOT_METRICS = ("alias", "name", "sample_len")  # what lm-eval's results hold beside the metrics
SEED = 0  # `cairn eval --seed`'s default


def task_names(spec: str) -> list[str]:
    """The task names of a comma-separated list, each once, `cairn_stories` as its two tasks."""
    names: list[str] = []
    for part in spec.split(","):
        name = part.strip()
        if not name:
            raise CairnError(f"--harness takes task names separated by commas, got {spec!r}")
        for n in LOCAL_TASKS if name == TAG else (name,):
            if n not in names:
                names.append(n)
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("'\"")
    return text.splitlines()[0].strip() if text else type(e).__name__


@contextlib.contextmanager
def _hub_offline(needed: bool) -> Iterator[bool]:
    """With the hub out of reach, lm-eval's datasets fail at once instead of retrying for a minute.
    Yields whether the hub is out of reach (or offline mode was asked for)."""
    if not needed:
        yield False
        return
    from cairn.data.sources import _hub_reachable, _offline_requested

    if _offline_requested():
        yield True
        return
    if _hub_reachable():
        yield False
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield True
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _load_tasks(manager: TaskManager, names: list[str], offline: bool = False) -> list[Task | Group]:
    """Each name as lm-eval builds it (a task, a group, or a tag's tasks); its failures in one line."""
    built: list[Task | Group] = []
    for name in names:
        try:
            got = manager.load([name])
        except KeyError:
            raise CairnError(f"lm-eval has no task {name!r}: see `lm_eval ls tasks`, or give "
                             f"{', '.join(LOCAL_TASKS)}") from None
        except Exception as e:  # datasets and lm-eval raise many types; all mean "cannot load it"
            hint = (" (offline: lm-eval's own tasks download their data from the Hugging Face hub; the story "
                    f"tasks {', '.join(LOCAL_TASKS)} need none)") if offline else ""
            raise CairnError(f"lm-eval cannot load task {name!r}: {_first_line(e)}{hint}") from None
        groups = got.get("groups") or {}
        built.extend([groups[name]] if name in groups else got["tasks"].values())
    return built


def evaluate_harness(path: str | Path, tasks: str, data: Optional[str] = None, split: str = "test",
                     device: str = "auto", limit: int = 0, seed: int = SEED,
                     precision: Optional[str] = None) -> dict[str, Any]:
    """Run lm-eval's `tasks` (comma-separated names) on the model at `path`: see `run_harness`."""
    names = task_names(tasks)
    if limit < 0:
        raise CairnError(f"--limit must be zero (all) or more, got {limit}")
    _require_lm_eval()
    from cairn.checkpoint.load import load

    return run_harness(load(path, device), names, data=data, split=split, limit=limit, seed=seed,
                       precision=precision)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CairnError(f"--harness needs lm-evaluation-harness: {INSTALL_HINT}") from None


def run_harness(loaded: Loaded, names: list[str], data: Optional[str] = None, split: str = "test", limit: int = 0,
                seed: int = SEED, precision: Optional[str] = None, lm: Optional[LM] = None) -> dict[str, Any]:
    """lm-eval's tasks `names` on a loaded run, scored by `CairnLM` (or by `lm`, another lm-eval
    model, given the same story tasks). Returns lm-eval's results per task ("results": {task:
    {metric: value}}, stderr as "<metric>_stderr"), the documents per task ("samples"), what the
    story tasks were built from ("what"), the checkpoint, lm-eval's version and the seconds taken."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cairn.eval.harness_lm import CairnLM
    from cairn.eval.story_tasks import held_out_stories, write_tasks

    start = time.perf_counter()
    local = [n for n in names if n in LOCAL_TASKS]
    passed = [n for n in names if n not in LOCAL_TASKS]
    what = None
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cairn-harness-") as tmp:
        include = None
        if local:
            texts, what = held_out_stories(loaded, data, split)
            include = str(write_tasks(Path(tmp), texts, seed, local))
        manager = TaskManager(include_path=include, include_defaults=bool(passed))
        # lm-eval prints progress and its bootstrap to stdout: it goes to stderr, stdout stays cairn's
        with contextlib.redirect_stdout(sys.stderr), _hub_offline(bool(passed)) as offline:
            built = _load_tasks(manager, names, offline)
            model = lm if lm is not None else CairnLM(loaded, precision=precision)
            out = lm_eval.simple_evaluate(model=model, tasks=built, task_manager=manager, limit=limit or None,
                                          bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    assert out is not None  # one process: rank 0
    results = {task: {k.replace(",none", ""): v for k, v in r.items() if k not in NOT_METRICS and v != "N/A"}
               for task, r in out["results"].items()}
    samples = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    return {"results": results, "samples": samples, "what": what, "checkpoint": str(loaded.path),
            "lm_eval": lm_eval.__version__, "seconds": round(time.perf_counter() - start, 3)}


def table(r: dict[str, Any]) -> str:
    """The results as lines of task, metric, value and standard error."""
    rows = []
    for task, metrics in r["results"].items():
        n = r["samples"].get(task)
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr")
            rows.append((task, f"{n:,}" if n is not None else "", metric, f"{value:.4f}",
                         f"± {err:.4f}" if isinstance(err, (int, float)) else ""))
    head = ("task", "docs", "metric", "value", "stderr")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows])
