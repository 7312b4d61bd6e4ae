"""Typed run configuration: model, data and training sections, presets, TOML files and overrides.

A run is described by one `RunConfig`. It is built as: preset (or defaults) -> config file ->
`--key value` overrides, then validated. Every field has a comment; `cairn train --help` prints
them, so this file is also the reference for every option.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .errors import CairnError
from .tokenizer import parse_bpe_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # tokens in the vocabulary (50257 = GPT-2); set from the tokenizer
    d_model: int = 768  # width of the residual stream (the embedding size)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 12  # attention heads; d_model must be divisible by it
    d_mlp: int = 3072  # hidden width of the MLP (4 * d_model in GPT-2)
    context_len: int = 1000  # longest sequence the model accepts (size of the position table)
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2 and the tutorial: yes)
    dropout: float = 0.0  # dropout on attention output, MLP output and embeddings
    norm_eps: float = 1e-5  # LayerNorm epsilon (torch default, as the tutorial)
    tie_embeddings: bool = False  # share the token embedding with the output head (GPT-2, nanoGPT); the tutorial: no
    positions: str = "sinusoidal"  # "sinusoidal" (fixed table added to the embeddings, the tutorial's) or "rope" (rotary, in attention)
    rope_theta: float = 10000.0  # base of the rotary frequencies (positions = "rope")
    norm: str = "layernorm"  # "layernorm" (the tutorial's) or "rmsnorm" (no mean, no bias: cheaper)
    mlp: str = "gelu"  # "gelu" (fc -> exact GELU -> proj, the tutorial's) or "swiglu" (silu(gate) * up -> down)
    zero_init: bool = False  # start the residual-branch output projections (and an untied head) at zero: every block starts as the identity


@dataclass
class DataConfig:
    source: str = "roneneldan/TinyStories"  # hub dataset id, or a local .txt/.jsonl/.parquet file, directory or glob
    hub_split: str = "train"  # split of the hub dataset to load (train/val/test are then made from it)
    text_field: str = "text"  # field holding the text in .jsonl/.parquet/hub records
    txt_separator: str = "<|endoftext|>"  # how .txt files separate stories: a line holding this string, or "blank" for blank lines
    n_samples: int = 0  # keep the first N stories after the seeded shuffle (0 = all)
    train_frac: float = 0.8  # fraction of stories for training
    val_frac: float = 0.1  # fraction for validation; the rest (1 - train - val) is the test split
    batching: str = "pack"  # "pack": stories joined by <|endoftext|> and cut into windows; "pad": one story per row, padded
    seq_len: int = 256  # tokens per training row (the window in pack mode, the longest row in pad mode)
    story_mask: bool = False  # pack mode: a token attends only to its own story, not to the stories packed before it
    pack_shift: bool = False  # pack mode: each epoch after the first cuts the stream into windows at a new seeded offset
    cache_dir: str = ""  # where tokenized data is cached ("" = $CAIRN_CACHE or ~/.cache/cairn)


@dataclass
class TrainConfig:
    batch_size: int = 32  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # cap on optimizer steps (0 = as many as the epochs give); the schedule is planned for it
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for embeddings, head, norms and biases (one lr)
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    lr: float = 5e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    embed_lr_scale: float = 1.0  # the token embedding's learning rate as a multiple of lr (and min_lr)
    schedule: str = "linear"  # after warm-up: "linear" decay (the tutorial's), "cosine", or "constant"
    warmup_steps: int = -1  # warm-up length in optimizer steps (-1 = use warmup_frac)
    warmup_frac: float = 0.05  # warm-up as a fraction of all steps (1.0 = the whole run, the tutorial's)
    weight_decay: float = 0.01  # AdamW weight decay, applied to matrices only (not biases, norms)
    embed_weight_decay: float = -1.0  # the token embedding's weight decay (-1 = weight_decay)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    report_every: int = 5  # log train loss every N steps
    eval_every: int = 0  # validate every N steps (0 = only at each epoch end)
    eval_batches: int = 0  # validation batches in the periodic evaluations (0 = all); epoch ends use all unless epoch_val = "sample"
    epoch_val: str = "full"  # validation at each epoch's end: "full" split, or "sample" (eval_batches, as eval_every's)
    patience: int = 5  # stop after this many evaluations without a better validation loss (0 = never)
    checkpoint_every: int = 50  # save a step checkpoint every N steps (0 = none)
    keep_checkpoints: int = 0  # keep only the newest K step checkpoints (0 = keep all)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a torch device string
    precision: str = "auto"  # "auto" (bf16 autocast where the device supports it well), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model
    num_threads: int = 0  # CPU threads for torch (0 = one per core)
    num_workers: int = 0  # DataLoader worker processes
    test_at_end: bool = True  # evaluate the test split at the end of training
    tensorboard: bool = False  # also log metrics to RUN/tensorboard/ (pip install 'cairn-lm[tensorboard]')
    skip_nonfinite: int = 0  # skip up to N updates whose loss or gradient is NaN/inf (0 = stop at the first)
    time_budget: str = ""  # e.g. "10m", "90s", "1.5h": measure, then plan the steps so the whole run (evaluations and stories included) ends within it; epochs is then ignored, max_steps still caps; "" = off
    end_stories: int = 3  # stories generated from fixed prompts and seeds at the end, printed and saved to RUN/stories.md
    end_story_tokens: int = 200  # longest end-of-run story in tokens
    parallel: str = "ddp"  # under torchrun: "ddp" (a copy per process) or "fsdp" (parameters and optimizer state sharded)
    dist_timeout_s: int = 600  # under torchrun: seconds to wait for the other ranks before the job fails


@dataclass
class RunConfig:
    name: str = "cairn"  # run name: checkpoints are called <name>_checkpoint_<...>
    seed: int = 42  # seeds the data shuffle, the model initialisation and the batch order
    tokenizer: str = "gpt2"  # "gpt2" (exact GPT-2 BPE), "bpe:N" (an N-token BPE learned on this run's training split, cached), or a directory made by `cairn tokenizer train`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "train")


def parse_duration(text: str) -> float:
    """Seconds in "600", "600s", "10m", "1.5h" (CairnError otherwise)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise CairnError(f"train.time_budget {text!r} is not a duration: give e.g. 600s, 10m or 1.5h")
    return seconds


# ---------------------------------------------------------------- field lookup and coercion

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def field_index() -> dict[str, tuple[Optional[str], str, Any]]:
    """Every settable key -> (section or None, field name, type). Short names are unique by design."""
    index: dict[str, tuple[Optional[str], str, Any]] = {}
    for name, tp in _field_types(RunConfig).items():
        if name not in SECTIONS:
            index[name] = (None, name, tp)
    for section in SECTIONS:
        cls = type(getattr(RunConfig(), section))
        for name, tp in _field_types(cls).items():
            assert name not in index, f"field name {name} is not unique"
            index[name] = (section, name, tp)
            index[f"{section}.{name}"] = (section, name, tp)
    return index


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = value.replace("_", "")
                return int(float(value)) if ("e" in value.lower() and float(value).is_integer()) else int(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError):
        pass
    else:
        raise AssertionError(f"unhandled type {tp}")
    tname = getattr(tp, "__name__", str(tp))
    example = {"int": "a whole number, e.g. 32", "float": "a finite number, e.g. 0.001",
               "bool": "true or false", "str": "text"}.get(tname, tname)
    raise CairnError(f"{key} must be {'a' if tname != 'int' else 'an'} {tname}, got {value!r}: give {example}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    index = field_index()
    norm = key.replace("-", "_")
    if norm not in index:
        raise CairnError(f"unknown option {key!r}: run `cairn train --help` to see every option")
    section, name, tp = index[norm]
    target = cfg if section is None else getattr(cfg, section)
    setattr(target, name, _coerce(key, value, tp))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return cfg


def load_toml(path: str | Path, cfg: Optional[RunConfig] = None) -> RunConfig:
    """Apply a TOML file (sections [model], [data], [train]; top-level name/seed/tokenizer/preset)."""
    path = Path(path)
    if path.is_dir():
        raise CairnError(f"config file {str(path)!r} is a directory: pass the path of a .toml file")
    if not path.is_file():
        raise CairnError(f"config file {str(path)!r} does not exist: check the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CairnError(f"config file {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise CairnError(f"config file {str(path)!r} is not valid TOML ({_one_line(e)}): fix the file") from None
    except OSError as e:
        raise CairnError(f"cannot read config file {str(path)!r} ({e.strerror or e}): check its permissions") from None
    if cfg is None:
        from .presets import PRESETS, preset  # at call time: presets.py imports this module

        name = raw.pop("preset", None)
        if name is not None and not isinstance(name, str):
            raise CairnError(f"config file {str(path)!r}: preset must be a string, got {name!r}: "
                             f"use one of {', '.join(sorted(PRESETS))}")
        try:
            cfg = preset(name) if name is not None else RunConfig()
        except CairnError as e:
            raise CairnError(f"config file {str(path)!r}: {e}") from None
    else:
        raw.pop("preset", None)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CairnError(f"config file {str(path)!r}: [{key}] must be a table: "
                                 f"put its settings under a [{key}] header")
            for sub, v in value.items():
                if f"{key}.{sub}" not in field_index():
                    raise CairnError(f"config file {str(path)!r}: unknown key {key}.{sub}: see `cairn train --help`")
                flat[f"{key}.{sub}"] = v
        elif isinstance(value, dict):
            raise CairnError(f"config file {str(path)!r}: unknown section [{key}]: use [model], [data] or [train]")
        else:
            if key not in field_index() or field_index()[key][0] is not None:
                raise CairnError(f"config file {str(path)!r}: unknown top-level key {key!r}: see `cairn train --help`")
            flat[key] = value
    try:
        return apply_overrides(cfg, flat)
    except CairnError as e:
        raise CairnError(f"config file {str(path)!r}: {e}") from None


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (the CLI prints every error as one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {type(v)} to TOML")


def to_toml(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in SECTIONS and v is not None]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d[section].items() if v is not None]
    return "\n".join(lines) + "\n"


def from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    flat = {k: v for k, v in d.items() if k not in SECTIONS}
    for section in SECTIONS:
        flat.update({f"{section}.{k}": v for k, v in d.get(section, {}).items()})
    return apply_overrides(cfg, flat)


# ---------------------------------------------------------------- validation

def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise CairnError naming the field and what to do."""
    m, d, t = cfg.model, cfg.data, cfg.train

    def positive(section: str, name: str, value, allow_zero: bool = False):
        if value < 0 or (value == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "positive"
            raise CairnError(f"{section}.{name} must be {need}, got {value}: "
                             f"set --{name.replace('_', '-')} to {'0 or more' if allow_zero else 'a positive value'}")

    if not cfg.name or cfg.name != cfg.name.strip() or any(c in cfg.name for c in "/\\\0") \
            or cfg.name in (".", ".."):
        raise CairnError(f"name {cfg.name!r} cannot name checkpoint files: "
                         "use letters, digits, '-', '_' or '.' (no path separators)")
    if cfg.seed < 0:
        raise CairnError(f"seed must be zero or more, got {cfg.seed}: set --seed to 0 or more")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "context_len"):
        positive("model", name, getattr(m, name))
    if m.d_model % m.n_heads:
        raise CairnError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}): "
                         "change --d-model or --n-heads")
    if m.d_model // m.n_heads % 2:
        raise CairnError(f"head size d_model/n_heads = {m.d_model // m.n_heads} must be even: "
                         "change --d-model or --n-heads")
    for name, allowed in (("positions", ("sinusoidal", "rope")), ("norm", ("layernorm", "rmsnorm")),
                          ("mlp", ("gelu", "swiglu"))):
        if getattr(m, name) not in allowed:
            raise CairnError(f"model.{name} must be {' or '.join(repr(a) for a in allowed)}, got {getattr(m, name)!r}: "
                             f"set --{name} to one of them")
    positive("model", "rope_theta", m.rope_theta)
    if not 0 <= m.dropout < 1:
        raise CairnError(f"model.dropout must be in [0, 1), got {m.dropout}: set --dropout to e.g. 0.1")
    positive("model", "norm_eps", m.norm_eps)

    positive("data", "n_samples", d.n_samples, allow_zero=True)
    positive("data", "seq_len", d.seq_len)
    if d.seq_len > m.context_len:
        raise CairnError(f"data.seq_len ({d.seq_len}) is longer than model.context_len ({m.context_len}): "
                         "lower seq_len or raise context_len")
    if not (0 < d.train_frac <= 1) or not (0 <= d.val_frac < 1):
        raise CairnError(f"data.train_frac must be in (0, 1] and data.val_frac in [0, 1), "
                         f"got {d.train_frac} and {d.val_frac}: change --train-frac / --val-frac")
    if d.train_frac + d.val_frac > 1 + 1e-9:
        raise CairnError(f"data.train_frac + data.val_frac = {d.train_frac + d.val_frac:g} is over 1: "
                         "the fractions must sum to at most 1 (the rest is the test split)")
    if d.batching not in ("pack", "pad"):
        raise CairnError(f"data.batching must be 'pack' or 'pad', got {d.batching!r}: use --batching pack or pad")
    if d.pack_shift and d.batching != "pack":
        raise CairnError("data.pack_shift is for packed rows (pad batching does not cut the stream into windows): "
                         "use --batching pack, or --pack-shift false")
    if d.story_mask and d.batching != "pack":
        raise CairnError("data.story_mask is for packed rows (pad batching gives each story a row of its own): "
                         "use --batching pack, or --story-mask false")
    if not d.source:
        raise CairnError("data.source is empty: pass --data PATH_OR_HUB_ID")

    for name in ("batch_size", "grad_accum", "epochs", "lr"):
        positive("train", name, getattr(t, name))
    for name in ("max_steps", "min_lr", "weight_decay", "grad_clip", "report_every", "eval_every",
                 "eval_batches", "patience", "checkpoint_every", "keep_checkpoints", "num_threads", "num_workers",
                 "skip_nonfinite"):
        positive("train", name, getattr(t, name), allow_zero=True)
    if t.min_lr > t.lr:
        raise CairnError(f"train.min_lr ({t.min_lr}) is above train.lr ({t.lr}): lower --min-lr or raise --lr")
    if t.schedule not in ("linear", "cosine", "constant"):
        raise CairnError(f"train.schedule must be 'linear', 'cosine' or 'constant', got {t.schedule!r}: "
                         "use one of them with --schedule")
    if t.warmup_steps < -1:
        raise CairnError(f"train.warmup_steps must be -1 (use warmup_frac) or zero or more, got {t.warmup_steps}: "
                         "change --warmup-steps")
    if not 0 <= t.warmup_frac <= 1:
        raise CairnError(f"train.warmup_frac must be in [0, 1], got {t.warmup_frac}: change --warmup-frac")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise CairnError(f"train.{name} must be in [0, 1), got {getattr(t, name)}: change --{name}")
    positive("train", "eps", t.eps)
    if t.time_budget:
        parse_duration(t.time_budget)
    positive("train", "end_stories", t.end_stories, allow_zero=True)
    positive("train", "end_story_tokens", t.end_story_tokens)
    if t.precision not in ("auto", "fp32", "bf16"):
        raise CairnError(f"train.precision must be 'auto', 'fp32' or 'bf16', got {t.precision!r}: "
                         "use one of them with --precision")
    if t.optimizer not in ("adamw", "muon"):
        raise CairnError(f"train.optimizer must be 'adamw' or 'muon', got {t.optimizer!r}: use --optimizer adamw or muon")
    if t.optimizer == "muon" and t.parallel == "fsdp":
        raise CairnError("train.optimizer muon needs whole weight matrices, which FSDP shards: "
                         "use --parallel ddp, or --optimizer adamw with FSDP")
    if not (math.isfinite(t.embed_lr_scale) and t.embed_lr_scale > 0):
        raise CairnError(f"train.embed_lr_scale must be a positive number, got {t.embed_lr_scale}: "
                         "change --embed-lr-scale (1 = the same lr as everything else)")
    if t.epoch_val not in ("full", "sample"):
        raise CairnError(f"train.epoch_val must be 'full' or 'sample', got {t.epoch_val!r}: use --epoch-val full or sample")
    if not (t.embed_weight_decay == -1 or (math.isfinite(t.embed_weight_decay) and t.embed_weight_decay >= 0)):
        raise CairnError(f"train.embed_weight_decay must be >= 0 (or -1 for weight_decay's), got "
                         f"{t.embed_weight_decay}: change --embed-weight-decay")
    if not 0 <= t.muon_momentum < 1:
        raise CairnError(f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}: change --muon-momentum")
    if t.parallel not in ("ddp", "fsdp"):
        raise CairnError(f"train.parallel must be 'ddp' or 'fsdp', got {t.parallel!r}: use --parallel ddp or fsdp")
    positive("train", "dist_timeout_s", t.dist_timeout_s)
    if cfg.tokenizer.startswith("bpe:"):
        parse_bpe_spec(cfg.tokenizer)
    elif cfg.tokenizer != "gpt2" and not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise CairnError(f"tokenizer {cfg.tokenizer!r} is neither 'gpt2', 'bpe:N' nor a directory holding "
                         "tokenizer.json: use 'gpt2', bpe:4096 (learned on the training split) or a directory "
                         "made by `cairn tokenizer train`")
    return cfg


def describe_options() -> str:
    """Every option with its default and comment, for --help."""
    import inspect

    out = []
    for section, cls in (("", RunConfig), ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        src = inspect.getsource(cls).splitlines()
        comments = {}
        for line in src:
            s = line.strip()
            if ":" in s and "#" in s and not s.startswith("#"):
                comments[s.split(":")[0].strip()] = s.split("#", 1)[1].strip()
        if section:
            out.append(f"\n  [{section}]")
        for f in fields(cls):
            if f.name in SECTIONS or f.name == "to_dict":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = "--" + f.name.replace("_", "-")
            out.append(f"  {flag:<20} {comments.get(f.name, '')} (default {default!r})")
    return "\n".join(out)
