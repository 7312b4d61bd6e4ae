"""Training curves of one or more runs as one picture (`cairn plot RUN_DIR [RUN_DIR ...]`).

Four panels, read from each run's `metrics.jsonl`: train and validation loss against optimizer steps,
the same against tokens seen, the learning rate, and the training throughput. One colour per run;
train loss is a solid line, validation loss dashed with dots, the final test loss a cross.

Needs matplotlib (`pip install 'cairn-lm[plot]'`); it draws with the Agg backend and never touches
pyplot's global state, so it works headless and inside other programs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from cairn.util.errors import CairnError, option

if TYPE_CHECKING:  # matplotlib is optional: imported on use
    from types import ModuleType

    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.typing import ColorType

INSTALL_HINT = "plotting needs matplotlib: pip install 'cairn-lm[plot]'"

PANEL_TITLES = ("Loss vs. steps", "Loss vs. tokens seen", "Learning rate", "Throughput")


@dataclass
class RunMetrics:
    """The records of one run, by kind, each sorted by step (the last record wins for a repeated step)."""

    path: Path
    name: str
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_metrics(run_dir: str | Path, name: Optional[str] = None) -> RunMetrics:
    """Read `run_dir/metrics.jsonl`. Raises CairnError for a missing directory or file, or no records."""
    if not str(run_dir).strip():
        raise CairnError("a run directory is empty: give the path of a run directory")
    path = Path(run_dir)
    if not path.exists():
        raise CairnError(f"run directory {str(path)!r} does not exist: check the path")
    if not path.is_dir():
        raise CairnError(f"{str(path)!r} is not a directory: give a run directory (it holds metrics.jsonl)")
    file = path / "metrics.jsonl"
    if not file.is_file():
        raise CairnError(f"{str(path)!r} has no metrics.jsonl: is it a cairn run directory?")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "val": {}, "test": {}}
    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise CairnError(f"cannot read {file}: {e.strerror or e}") from None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if not isinstance(record, dict) or record.get("kind") not in by_kind or not _finite(record.get("step")):
            continue
        by_kind[record["kind"]][int(record["step"])] = record
    run = RunMetrics(path, name or (path.resolve().name or str(path)),
                     **{kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()})
    if not (run.train or run.val or run.test):
        raise CairnError(f"{file} has no metrics records yet: plot it once training has reported a step")
    return run


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names: the directory names, with more of a path only where two would be the same."""
    parts = [p.resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        names = [Path(*p[-d:]).as_posix() for p, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def _points(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if _finite(r.get(x)) and _finite(r.get(key)):
            xs.append(float(r[x]))
            ys.append(float(r[key]))
    return xs, ys


def tokens_at(train: list[dict], steps: Sequence[float]) -> list[Optional[float]]:
    """Tokens seen at each step, interpolated linearly between train records (and from step 0 = 0
    tokens); past the last train record, extrapolated at that run's mean tokens per step. None where
    the run's train records carry no token counts."""
    known = [(0.0, 0.0)] + [(float(r["step"]), float(r["tokens"])) for r in train
                            if _finite(r.get("tokens")) and r["step"] > 0]
    if len(known) < 2:
        return [None] * len(steps)
    out: list[Optional[float]] = []
    for s in steps:
        if s >= known[-1][0]:
            last_step, last_tokens = known[-1]
            out.append(last_tokens * s / last_step)
            continue
        for (s0, t0), (s1, t1) in zip(known, known[1:]):
            if s0 <= s <= s1:
                out.append(t0 + (t1 - t0) * (s - s0) / (s1 - s0) if s1 > s0 else t1)
                break
    return out


def _import_matplotlib() -> tuple[type[Figure], type[FigureCanvasAgg], type[Line2D], ModuleType]:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib import ticker
    except ImportError:
        raise CairnError(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg, Line2D, ticker


def plot_runs(paths: Sequence[str | Path], out: Optional[str | Path] = None, *,
              title: Optional[str] = None) -> Figure:
    """Draw the runs' curves on one figure and, if `out` is given, save it there (PNG, or whatever
    format the suffix names: .svg, .pdf). Returns the matplotlib Figure.

    Axes in order: loss vs. steps, loss vs. tokens seen, learning rate, throughput. Each line's label
    is "<run>: <series>" with series train, val, test, lr or tokens/s.
    """
    if not paths:
        raise CairnError("no run directories given: cairn plot RUN_DIR [RUN_DIR ...]")
    runs_paths = [Path(p) for p in paths]
    names = _run_names(runs_paths) if len(runs_paths) > 1 else [None]
    runs = [read_metrics(p, n) for p, n in zip(runs_paths, names)]
    Figure, FigureCanvasAgg, Line2D, ticker = _import_matplotlib()

    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colours: list[ColorType] = [f"C{i % 10}" for i in range(len(runs))]
    if len(runs) > 10:
        import matplotlib

        cmap = matplotlib.colormaps["turbo"]
        colours = [cmap(i / (len(runs) - 1)) for i in range(len(runs))]

    losses = _draw_curves(axes.flat, runs, colours)
    _format_axes(axes, losses, ticker)
    _legend(fig, runs, colours, Line2D)
    fig.suptitle(title or ("cairn: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")), fontsize=14)

    if out is not None:
        save(fig, out)
    return fig


def _draw_curves(axes: Iterable[Axes], runs: Sequence[RunMetrics], colours: Sequence[ColorType]) -> list[float]:
    """Each run's loss, learning-rate and throughput lines; returns every loss drawn."""
    ax_step, ax_tok, ax_lr, ax_tps = axes
    losses: list[float] = []
    for run, colour in zip(runs, colours):
        n = run.name
        # loss vs steps
        xs, ys = _points(run.train, "train_loss")
        ax_step.plot(xs, ys, "-", color=colour, lw=1.6, alpha=0.85, label=f"{n}: train")
        losses += ys
        vx, vy = _points(run.val, "val_loss")
        ax_step.plot(vx, vy, "--o", color=colour, lw=1.4, ms=5, mec="white", mew=0.7, zorder=3, label=f"{n}: val")
        losses += vy
        tx, ty = _points(run.test, "test_loss")
        if tx:
            ax_step.plot(tx, ty, "X", color=colour, ms=9, mec="black", mew=0.6, label=f"{n}: test")
            losses += ty
        # loss vs tokens: train records carry tokens; val and test are placed by their step
        kx, ky = _points(run.train, "train_loss", x="tokens")
        ax_tok.plot(kx, ky, "-", color=colour, lw=1.6, alpha=0.85, label=f"{n}: train")
        vt = tokens_at(run.train, vx)
        pts = [(t, y) for t, y in zip(vt, vy) if t is not None]
        ax_tok.plot([t for t, _ in pts], [y for _, y in pts], "--o", color=colour, lw=1.4, ms=5, mec="white", mew=0.7,
                    zorder=3, label=f"{n}: val")
        tt = tokens_at(run.train, tx)
        pts = [(t, y) for t, y in zip(tt, ty) if t is not None]
        if pts:
            ax_tok.plot([t for t, _ in pts], [y for _, y in pts], "X", color=colour, ms=9, mec="black", mew=0.6,
                        label=f"{n}: test")
        # learning rate and throughput
        ax_lr.plot(*_points(run.train, "lr"), "-", color=colour, lw=1.6, label=f"{n}: lr")
        ax_tps.plot(*_points(run.train, "tokens_per_s"), "-", color=colour, lw=1.6, marker=".", ms=4,
                    label=f"{n}: tokens/s")

    return losses


def _format_axes(axes: np.ndarray, losses: list[float], ticker: ModuleType) -> None:
    """Labels, scales and titles of the four panels (`axes`: the 2 x 2 array of Figure.subplots)."""
    ax_step, ax_tok, ax_lr, ax_tps = axes.flat
    # a log scale for the loss when it spans a wide range (as from-scratch runs do: ~10 down to ~2-5),
    # so the slow late progress is not squashed under the steep start
    positive = [v for v in losses if v > 0]
    log_loss = bool(positive) and max(positive) / min(positive) > 2.5
    for ax, xlabel in ((ax_step, "optimizer step"), (ax_tok, "tokens seen")):
        ax.set_ylabel("loss (nats/token" + (", log scale)" if log_loss else ")"))
        ax.set_xlabel(xlabel)
        if log_loss:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_tok.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    ax_tps.set_xlabel("optimizer step")
    ax_tps.set_ylabel("training tokens / s")
    ax_tps.yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    ax_tps.set_ylim(bottom=0)
    ax_lr.set_ylim(bottom=0)
    for ax in axes.flat:  # every x axis counts from the start of training
        ax.set_xlim(left=0)
    for ax, t in zip(axes.flat, PANEL_TITLES):
        ax.set_title(t, fontsize=12)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=10)
        ax.xaxis.label.set_size(11)
        ax.yaxis.label.set_size(11)
        if not any(len(line.get_xdata()) for line in ax.get_lines()):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")



def _legend(fig: Figure, runs: Sequence[RunMetrics], colours: Sequence[ColorType], Line2D: type[Line2D]) -> None:
    # one legend for the whole figure: a colour per run, a line style per series
    handles = []
    for run, colour in zip(runs, colours):
        scores = []
        best = min(_points(run.val, "val_loss")[1], default=None)
        if best is not None:
            scores.append(f"best val {best:.3f}")
        test = _points(run.test, "test_loss")[1]
        if test:
            scores.append(f"test {test[-1]:.3f}")
        label = run.name + (f"  ({', '.join(scores)})" if scores else "")
        handles.append(Line2D([], [], color=colour, lw=3, label=label))
    handles += [Line2D([], [], color="0.3", ls="-", lw=1.6, label="train"),
                Line2D([], [], color="0.3", ls="--", marker="o", ms=5, mec="white", mew=0.7, lw=1.4,
                       label="validation")]
    if any(run.test for run in runs):
        handles.append(Line2D([], [], color="0.3", ls="", marker="X", ms=9, mec="black", mew=0.6, label="test"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=10,
               frameon=False)


def save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise CairnError(f"{option('out')} {str(out)!r} is a directory: give a file name such as {out / 'plot.png'}")
    if not out.parent.is_dir():
        raise CairnError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    try:
        fig.savefig(out)
    except ValueError as e:  # an unknown format suffix
        raise CairnError(f"cannot write {str(out)!r}: {e}") from None
    except OSError as e:
        raise CairnError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return out


def default_out(paths: Sequence[str | Path]) -> Path:
    """RUN_DIR/plot.png for one run; runs.png in the current directory for several."""
    return Path(paths[0]) / "plot.png" if len(paths) == 1 else Path("runs.png")
