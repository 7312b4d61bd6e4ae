"""Named starting points for a run (`cairn train --preset NAME`); docs/presets.md says why each is as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cairn.config.io import load_toml, read_toml
from cairn.config.sections import (BudgetConfig, CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                   ReportConfig, RunConfig, ScheduleConfig, SystemConfig, TrainConfig)
from cairn.util.errors import CairnError


def _reference_105m() -> RunConfig:
    """The tutorial's system, every hyperparameter as it sets it (only its bugs fixed)."""
    cfg = RunConfig(name="autoregressive-105m")
    cfg.model = ModelConfig(vocab_size=50257, d_model=768, n_layers=4, n_heads=12, d_mlp=3072, context_len=1000)
    cfg.data = DataConfig(n_samples=100, train_frac=0.8, val_frac=0.1, batching="pad", seq_len=1000)
    # AdamW with torch's defaults (the tutorial passes only lr); warm-up 5% of the run, not all of it.
    cfg.train = TrainConfig(batch_size=32, epochs=1)
    cfg.schedule = ScheduleConfig(lr=5e-4, schedule="linear", warmup_frac=0.05)
    cfg.optim = OptimConfig(grad_clip=1.0, weight_decay=0.01, beta1=0.9, beta2=0.999)
    cfg.report = ReportConfig(report_every=5)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=50)
    # the tutorial's final checkpoint holds the last weights
    cfg.eval = EvalConfig(patience=5, end_on_best=False)
    return cfg


def _cpu_small() -> RunConfig:
    """A small GPT-2-vocabulary model that learns visibly on 2 CPU cores in about 10 minutes."""
    cfg = RunConfig(name="cpu-small")
    cfg.model = ModelConfig(vocab_size=50257, d_model=192, n_layers=4, n_heads=6, d_mlp=768, context_len=256,
                            tie_embeddings=True)
    cfg.data = DataConfig(batching="pack", seq_len=256, train_frac=0.9, val_frac=0.05)
    cfg.train = TrainConfig(batch_size=4, epochs=1, max_steps=360)
    cfg.schedule = ScheduleConfig(lr=3e-3, min_lr=3e-4, schedule="cosine", warmup_frac=0.03)
    cfg.optim = OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
    cfg.report = ReportConfig(report_every=10)
    cfg.eval = EvalConfig(eval_every=60, eval_batches=8, patience=0)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=120, keep_checkpoints=2)
    return cfg


def _cpu_10min() -> RunConfig:
    """The best model 2 CPU cores train in 10 minutes, whole command included: a Llama block of 1.65M
    parameters on an own 4096-token BPE, each choice measured at equal wall time (docs/presets.md)."""
    cfg = RunConfig(name="cpu-10min", tokenizer="bpe:4096")
    cfg.model = ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=2, d_mlp=352, context_len=256,
                            bias=False, tie_embeddings=False, positions="rope", norm="rmsnorm", mlp="swiglu")
    cfg.data = DataConfig(batching="pack", seq_len=256, train_frac=0.9, val_frac=0.05, story_mask=True)
    cfg.train = TrainConfig(batch_size=4, epochs=1)
    cfg.schedule = ScheduleConfig(lr=2.5e-3, min_lr=0.0, schedule="linear", warmup_frac=0.03)
    cfg.optim = OptimConfig(embed_lr_scale=10.0, weight_decay=0.1, beta1=0.9, beta2=0.999, grad_clip=1.0)
    cfg.system = SystemConfig(compile=True)
    cfg.report = ReportConfig(report_every=50)
    cfg.eval = EvalConfig(eval_every=500, eval_batches=8, epoch_val="sample", patience=0, end_stories=3,
                          end_story_tokens=300)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=500, keep_checkpoints=2)
    # a machine fast enough for more than 10 epochs trains a wider model instead: on a 2-core
    # avx512_bf16 EPYC in bf16, d192 for 8.5 epochs beat d128 for 14.4 (0.932 against 0.945
    # bits/byte; d384 for 4.4 epochs: 1.027). Records: benchmarks/runs/cpu-10min-bf16-*-2026-12-02
    cfg.budget = BudgetConfig(time_budget="10m", grow_to_epochs=10)
    return cfg


def _cpu_instruct() -> RunConfig:
    """Instruction-tune a cpu-10min run (`--init-from RUN`) on prompt/response records in 5 minutes on
    2 CPU cores: the architecture and tokenizer come from that run; a lower peak learning rate than
    pre-training, whole examples packed under the story mask, the loss on the answers only."""
    base = _cpu_10min()
    cfg = RunConfig(name="cpu-instruct", tokenizer=base.tokenizer, model=base.model)
    # a small validation split, no test and one end story: on 2 shared cores an evaluation batch costs
    # about half a step, and a 5-minute budget is better spent on steps
    cfg.data = DataConfig(format="sft", batching="pack", seq_len=256, train_frac=0.98, val_frac=0.02,
                          story_mask=True)
    cfg.train = TrainConfig(batch_size=4, epochs=1)
    cfg.schedule = ScheduleConfig(lr=2e-3, min_lr=0.0, schedule="linear", warmup_frac=0.03)
    cfg.optim = OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.999, grad_clip=1.0)
    cfg.budget = BudgetConfig(time_budget="5m")
    cfg.report = ReportConfig(report_every=25)
    cfg.eval = EvalConfig(eval_every=0, eval_batches=8, epoch_val="sample", patience=0, test_at_end=False,
                          end_stories=1, end_story_tokens=200)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=200, keep_checkpoints=2)
    return cfg


def _tiny() -> RunConfig:
    """A toy model for tests and smoke runs: seconds on a CPU. It keeps the first 1,000 stories of
    the seeded shuffle (n_samples), so its held-out splits are 100 stories each and a smoke run's
    scoring takes seconds on any corpus; its test score is still the whole test split's, the figure
    `cairn eval` gives."""
    cfg = RunConfig(name="tiny")
    cfg.model = ModelConfig(vocab_size=50257, d_model=64, n_layers=2, n_heads=4, d_mlp=256, context_len=128)
    cfg.data = DataConfig(batching="pack", seq_len=64, n_samples=1000)
    cfg.train = TrainConfig(batch_size=8)
    cfg.schedule = ScheduleConfig(lr=3e-3, schedule="cosine", warmup_frac=0.1)
    cfg.optim = OptimConfig(weight_decay=0.1, beta2=0.95)
    cfg.report = ReportConfig(report_every=5)
    cfg.eval = EvalConfig(eval_every=20, eval_batches=5, end_stories=1, end_story_tokens=32)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=20)
    return cfg


PRESETS = {
    "reference-105m": _reference_105m,
    "cpu-small": _cpu_small,
    "cpu-10min": _cpu_10min,
    "cpu-instruct": _cpu_instruct,
    "tiny": _tiny,
}


def preset(name: str) -> RunConfig:
    """A fresh copy of the named preset (CairnError naming the choices if there is none)."""
    if name not in PRESETS:
        raise CairnError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def config_file(path: str | Path, base: Optional[RunConfig] = None) -> RunConfig:
    """A TOML config file over `base`; without one, over the preset its own `preset = "..."` line
    names (or the defaults)."""
    if base is None:
        name = read_toml(path).get("preset")
        if name is not None and not isinstance(name, str):
            raise CairnError(f"config file {str(path)!r}: preset must be a string, got {name!r}: "
                             f"use one of {', '.join(sorted(PRESETS))}")
        try:
            base = preset(name) if name is not None else RunConfig()
        except CairnError as e:
            raise CairnError(f"config file {str(path)!r}: {e.raw()}") from None
    return load_toml(path, base)
