"""Train-loss reports: the mean loss since the last report, throughput and MFU, to the log and metrics.jsonl."""

from __future__ import annotations

import logging
import math
import time
from typing import Mapping, Optional, Protocol

from cairn.training.rundir import MetricsLog
from cairn.checkpoint.schema import TrainState

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What a report updates of a progress bar (tqdm's)."""

    def set_postfix(self, ordered_dict: Optional[Mapping[str, object]] = None, refresh: Optional[bool] = True,
                    **kwargs: object) -> None: ...


class Reporter:
    def __init__(self, every: int, metrics: MetricsLog, peak_flops: Optional[float], flops_per_token: float,
                 world: int):
        self.every, self.metrics = every, metrics
        # MFU counts the real (non-padding) tokens: padding is compute that teaches nothing
        self.peak = peak_flops * world if peak_flops else None
        self.flops_per_token = flops_per_token
        self.restart()

    def restart(self) -> None:
        """Time from now: evaluations and checkpoints are not training throughput."""
        self.timed_tokens, self.window_start = 0, time.perf_counter()

    def add(self, s: TrainState, loss: float, n_tokens: int) -> None:
        s.epoch_loss_sum += loss * n_tokens
        s.epoch_tokens += n_tokens
        s.window_loss_sum += loss * n_tokens
        s.window_tokens += n_tokens
        self.timed_tokens += n_tokens

    def due(self, step: int, total: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == total  # 0: only the last step

    def report(self, s: TrainState, total: int, lr: float, grad_norm: float, bar: Progress) -> None:
        tps = self.timed_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        mean = s.window_loss_sum / max(s.window_tokens, 1)
        mfu = tps * self.flops_per_token / self.peak if self.peak else None
        mfu_text = f", MFU {mfu:.1%}" if mfu is not None else ""
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=mfu_text[6:] or "n/a")
        self.metrics.write({"kind": "train", "step": s.step, "epoch": s.epoch + 1, "train_loss": mean,
                            "train_perplexity": math.exp(min(mean, 700)), "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": tps, "mfu": mfu, "tokens": s.tokens_seen, "time": time.time()})
        log.info(f"step {s.step}/{total}: loss {mean:.4f}, lr {lr:.2e}, {tps:,.0f} tok/s{mfu_text}")
        s.window_loss_sum, s.window_tokens = 0.0, 0
        self.restart()
