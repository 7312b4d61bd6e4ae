"""Typed run configuration: the model, data and training sections, TOML files and overrides.

A run is described by one `RunConfig`, built as: preset (or defaults) -> config file -> `--key value`
overrides, then validated. Every field carries its help text, which `cairn train --help` prints, so this
file is also the reference for every option. A field with a fixed set of values is typed `Literal[...]`:
the allowed values are read from the type, when a value is set and when a config is validated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import tomli_w

from cairn.util.errors import CairnError
from cairn.tokenizer.base import parse_bpe_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def opt(default: Any, help: str) -> Any:
    """A config field and its `--help` text."""
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------- the rules every section uses

def _qual(section: Optional[str], name: str) -> str:
    return f"{section}.{name}" if section else name


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _choices(tp: Any) -> Optional[tuple]:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choice(qual: str, value: Any, choices: tuple) -> None:
    """The one check of a Literal field's value, for values being set and configs being validated alike."""
    if value not in choices:
        allowed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
        raise CairnError(f"{qual} must be {allowed}, got {value!r}: set {_flag(qual.split('.')[-1])} to one of them")


def check_choices(obj: Any, section: Optional[str]) -> None:
    """Every Literal-typed field of a section holds one of its values."""
    for name, tp in _field_types(type(obj)).items():
        choices = _choices(tp)
        if choices is not None:
            check_choice(_qual(section, name), getattr(obj, name), choices)


def positive(obj: Any, section: Optional[str], names: str, zero_ok: bool = False) -> None:
    """Each of the space-separated fields is > 0 (>= 0 with zero_ok)."""
    for name in names.split():
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not zero_ok):
            need, hint = ("zero or more", "0 or more") if zero_ok else ("positive", "a positive value")
            raise CairnError(f"{_qual(section, name)} must be {need}, got {value}: set {_flag(name)} to {hint}")


def below_one(obj: Any, section: str, names: str) -> None:
    """Each of the space-separated fields is in [0, 1)."""
    for name in names.split():
        if not 0 <= getattr(obj, name) < 1:
            raise CairnError(f"{section}.{name} must be in [0, 1), got {getattr(obj, name)}: change {_flag(name)}")


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


# ---------------------------------------------------------------- the sections

@dataclass
class ModelConfig:
    vocab_size: int = opt(50257, "tokens in the vocabulary (50257 = GPT-2); set from the tokenizer")
    d_model: int = opt(768, "width of the residual stream (the embedding size)")
    n_layers: int = opt(4, "transformer blocks")
    n_heads: int = opt(12, "attention heads; d_model must be divisible by it")
    d_mlp: int = opt(3072, "hidden width of the MLP (4 * d_model in GPT-2)")
    context_len: int = opt(1000, "longest sequence the model accepts (size of the position table)")
    bias: bool = opt(True, "biases in the linear layers and LayerNorms (GPT-2 and the tutorial: yes)")
    dropout: float = opt(0.0, "dropout on attention output, MLP output and embeddings")
    norm_eps: float = opt(1e-5, "LayerNorm epsilon (torch default, as the tutorial)")
    tie_embeddings: bool = opt(False, "share the token embedding with the output head (GPT-2, nanoGPT); the "
                                      "tutorial: no")
    positions: Literal["sinusoidal", "rope"] = opt(
        "sinusoidal", '"sinusoidal" (fixed table added to the embeddings, the tutorial\'s) or "rope" (rotary, in '
                      "attention)")
    rope_theta: float = opt(10000.0, 'base of the rotary frequencies (positions = "rope")')
    norm: Literal["layernorm", "rmsnorm"] = opt(
        "layernorm", '"layernorm" (the tutorial\'s) or "rmsnorm" (no mean, no bias: cheaper)')
    mlp: Literal["gelu", "swiglu"] = opt(
        "gelu", '"gelu" (fc -> exact GELU -> proj, the tutorial\'s) or "swiglu" (silu(gate) * up -> down)')
    zero_init: bool = opt(False, "start the residual-branch output projections (and an untied head) at zero: every "
                                 "block starts as the identity")

    def check(self) -> None:
        check_choices(self, "model")
        positive(self, "model", "vocab_size d_model n_layers n_heads d_mlp context_len rope_theta norm_eps")
        if self.d_model % self.n_heads:
            raise CairnError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}): "
                             "change --d-model or --n-heads")
        if self.d_model // self.n_heads % 2:
            raise CairnError(f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even: "
                             "change --d-model or --n-heads")
        if not 0 <= self.dropout < 1:
            raise CairnError(f"model.dropout must be in [0, 1), got {self.dropout}: set --dropout to e.g. 0.1")


@dataclass
class DataConfig:
    source: str = opt(
        "roneneldan/TinyStories", "hub dataset id, or a local .txt/.jsonl/.parquet file, directory or glob")
    hub_split: str = opt("train", "split of the hub dataset to load (train/val/test are then made from it)")
    text_field: str = opt("text", "field holding the text in .jsonl/.parquet/hub records")
    txt_separator: str = opt("<|endoftext|>", "how .txt files separate stories: a line holding this string, or "
                                              '"blank" for blank lines')
    n_samples: int = opt(0, "keep the first N stories after the seeded shuffle (0 = all)")
    train_frac: float = opt(0.8, "fraction of stories for training")
    val_frac: float = opt(0.1, "fraction for validation; the rest (1 - train - val) is the test split")
    batching: Literal["pack", "pad"] = opt(
        "pack", '"pack": stories joined by <|endoftext|> and cut into windows; "pad": one story per row, padded')
    seq_len: int = opt(256, "tokens per training row (the window in pack mode, the longest row in pad mode)")
    story_mask: bool = opt(False, "pack mode: a token attends only to its own story, not to the stories packed "
                                  "before it")
    pack_shift: bool = opt(False, "pack mode: each epoch after the first cuts the stream into windows at a new "
                                  "seeded offset")
    cache_dir: str = opt("", 'where tokenized data is cached ("" = $CAIRN_CACHE or ~/.cache/cairn)')
    format: Literal["text", "sft"] = opt(
        "text", '"text": stories; "sft": JSONL instruction records (prompt/response or messages), the loss on '
                "the responses only")
    prompt_field: str = opt("prompt", "sft: field holding the instruction")
    response_field: str = opt("response", "sft: field holding the answer")
    messages_field: str = opt("messages", 'sft: field holding a conversation, a list of {"role", "content"}')
    template_system: str = opt("{content}\n", "chat template: a system turn ({content} is its text)")
    template_user: str = opt("User: {content}\n", "chat template: a user turn")
    template_assistant: str = opt("Assistant: {content}", "chat template: an assistant turn (the text before "
                                                          "{content} ends every prompt)")
    template_separator: str = opt("\n", "chat template: written after an assistant turn that is not the last")

    def check(self) -> None:
        check_choices(self, "data")
        positive(self, "data", "n_samples", zero_ok=True)
        positive(self, "data", "seq_len")
        if not (0 < self.train_frac <= 1) or not (0 <= self.val_frac < 1):
            raise CairnError(f"data.train_frac must be in (0, 1] and data.val_frac in [0, 1), "
                             f"got {self.train_frac} and {self.val_frac}: change --train-frac / --val-frac")
        if self.train_frac + self.val_frac > 1 + 1e-9:
            raise CairnError(f"data.train_frac + data.val_frac = {self.train_frac + self.val_frac:g} is over 1: "
                             "the fractions must sum to at most 1 (the rest is the test split)")
        if self.pack_shift and self.batching != "pack":
            raise CairnError("data.pack_shift is for packed rows (pad batching does not cut the stream into "
                             "windows): use --batching pack, or --pack-shift false")
        if self.story_mask and self.batching != "pack":
            raise CairnError("data.story_mask is for packed rows (pad batching gives each story a row of its own): "
                             "use --batching pack, or --story-mask false")
        if not self.source:
            raise CairnError("data.source is empty: pass --data PATH_OR_HUB_ID")
        if self.format == "sft":
            from cairn.tokenizer.chat_template import ChatTemplate

            ChatTemplate.from_config(self)
            if self.batching == "pack" and not self.story_mask:
                raise CairnError("data.format sft packs whole examples into rows, which must not attend to each "
                                 "other: add --story-mask true, or use --batching pad")
            if self.pack_shift:
                raise CairnError("data.pack_shift cuts a token stream, and sft rows hold whole examples: "
                                 "use --pack-shift false")


@dataclass
class TrainConfig:
    batch_size: int = opt(32, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    epochs: int = opt(1, "passes over the training split")
    max_steps: int = opt(
        0, "cap on optimizer steps (0 = as many as the epochs give); the schedule is planned for it")
    optimizer: Literal["adamw", "muon"] = opt(
        "adamw", '"adamw", or "muon": Muon for the blocks\' weight matrices, AdamW for embeddings, head, norms and '
                 "biases (one lr)")
    muon_momentum: float = opt(0.95, "Muon's (Nesterov) momentum")
    lr: float = opt(5e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of the decay")
    embed_lr_scale: float = opt(1.0, "the token embedding's learning rate as a multiple of lr (and min_lr)")
    schedule: Literal["linear", "cosine", "constant"] = opt(
        "linear", 'after warm-up: "linear" decay (the tutorial\'s), "cosine", or "constant"')
    warmup_steps: int = opt(-1, "warm-up length in optimizer steps (-1 = use warmup_frac)")
    warmup_frac: float = opt(0.05, "warm-up as a fraction of all steps (1.0 = the whole run, the tutorial's)")
    weight_decay: float = opt(0.01, "AdamW weight decay, applied to matrices only (not biases, norms)")
    embed_weight_decay: float = opt(-1.0, "the token embedding's weight decay (-1 = weight_decay)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    report_every: int = opt(5, "log train loss every N steps")
    eval_every: int = opt(0, "validate every N steps (0 = only at each epoch end)")
    eval_batches: int = opt(0, "validation batches in the periodic evaluations (0 = all); epoch ends use all "
                               'unless epoch_val = "sample"')
    epoch_val: Literal["full", "sample"] = opt(
        "full", 'validation at each epoch\'s end: "full" split, or "sample" (eval_batches, as eval_every\'s)')
    patience: int = opt(5, "stop after this many evaluations without a better validation loss (0 = never)")
    checkpoint_every: int = opt(50, "save a step checkpoint every N steps (0 = none)")
    keep_checkpoints: int = opt(0, "keep only the newest K step checkpoints (0 = keep all)")
    device: str = opt("auto", '"auto" (cuda, then mps, then cpu), or a torch device string')
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", '"auto" (bf16 autocast on GPUs that have it, and on CPUs with native bf16 where the run\'s matmuls '
                'measure faster in it: docs/precision.md), "fp32" or "bf16"')
    compile: bool = opt(False, "torch.compile the model")
    num_threads: int = opt(0, "CPU threads for torch (0 = one per core)")
    num_workers: int = opt(0, "DataLoader worker processes")
    test_at_end: bool = opt(True, "evaluate the test split at the end of training")
    end_on_best: bool = opt(True, "when the best validated weights of the run validate better on the whole split "
                                  "than the last ones, end on them (the last state stays resumable)")
    tensorboard: bool = opt(False, "also log metrics to RUN/tensorboard/ (pip install 'cairn-lm[tensorboard]')")
    skip_nonfinite: int = opt(0, "skip up to N updates whose loss or gradient is NaN/inf (0 = stop at the first)")
    time_budget: str = opt("", 'e.g. "10m", "90s", "1.5h": measure, then plan the steps so the whole run '
                               "(evaluations and stories included) ends within it; epochs is then ignored, "
                               'max_steps still caps; "" = off')
    grow_to_epochs: float = opt(
        0.0, "under a time budget: when more than this many epochs of the training split would fit, train a wider "
             "model that takes about this many instead (0 = never; docs/training.md)")
    end_stories: int = opt(3, "stories generated from fixed prompts and seeds at the end, printed and saved to "
                              "RUN/stories.md")
    end_story_tokens: int = opt(200, "longest end-of-run story in tokens")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", 'under torchrun: "ddp" (a copy per process) or "fsdp" (parameters and optimizer state sharded)')
    dist_timeout_s: int = opt(600, "under torchrun: seconds to wait for the other ranks before the job fails")
    lora_rank: int = opt(0, "LoRA (peft): train rank-R adapters on --lora-targets, the model frozen (0 = off: "
                            "train every weight)")
    lora_alpha: float = opt(16.0, "LoRA scale: the adapters' update is multiplied by lora_alpha / lora_rank")
    lora_targets: str = opt("", "LoRA: comma-separated names of the linear layers to adapt, by last name (qkv, "
                                "proj, fc, gate, up, lm_head) or full path (\"\" = every linear of the blocks)")

    def check(self) -> None:
        check_choices(self, "train")
        positive(self, "train", "batch_size grad_accum epochs lr eps end_story_tokens dist_timeout_s")
        positive(self, "train", "max_steps min_lr weight_decay grad_clip report_every eval_every eval_batches "
                 "patience checkpoint_every keep_checkpoints num_threads num_workers skip_nonfinite end_stories "
                 "grow_to_epochs", zero_ok=True)
        below_one(self, "train", "beta1 beta2 muon_momentum")
        if self.min_lr > self.lr:
            raise CairnError(f"train.min_lr ({self.min_lr}) is above train.lr ({self.lr}): "
                             "lower --min-lr or raise --lr")
        if self.warmup_steps < -1:
            raise CairnError(f"train.warmup_steps must be -1 (use warmup_frac) or zero or more, "
                             f"got {self.warmup_steps}: change --warmup-steps")
        if not 0 <= self.warmup_frac <= 1:
            raise CairnError(f"train.warmup_frac must be in [0, 1], got {self.warmup_frac}: change --warmup-frac")
        if not (math.isfinite(self.embed_lr_scale) and self.embed_lr_scale > 0):
            raise CairnError(f"train.embed_lr_scale must be a positive number, got {self.embed_lr_scale}: "
                             "change --embed-lr-scale (1 = the same lr as everything else)")
        wd = self.embed_weight_decay
        if not (wd == -1 or (math.isfinite(wd) and wd >= 0)):
            raise CairnError(f"train.embed_weight_decay must be >= 0 (or -1 for weight_decay's), got "
                             f"{wd}: change --embed-weight-decay")
        if self.time_budget:
            parse_duration(self.time_budget)
        positive(self, "train", "lora_rank", zero_ok=True)
        positive(self, "train", "lora_alpha")


MAX_NAME_BYTES = 200  # a checkpoint is <name>_checkpoint_step0000000, written as .<that>.tmp-PID


@dataclass
class RunConfig:
    name: str = opt("cairn", "run name: checkpoints are called <name>_checkpoint_<...>")
    seed: int = opt(42, "seeds the data shuffle, the model initialisation and the batch order")
    tokenizer: str = opt("gpt2", '"gpt2" (exact GPT-2 BPE), "bpe:N" (an N-token BPE learned on this run\'s '
                                 "training split, cached), or a directory made by `cairn tokenizer train`")
    init_from: str = opt("", "start from this run's (or checkpoint's) weights, with its architecture and tokenizer "
                             "and a fresh optimizer and schedule (\"\" = random weights)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """The top-level fields and the rules that span sections."""
        if not self.name or self.name != self.name.strip() or any(c in self.name for c in "/\\\0") \
                or self.name in (".", ".."):
            raise CairnError(f"name {self.name!r} cannot name checkpoint files: "
                             "use letters, digits, '-', '_' or '.' (no path separators)")
        if len(self.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise CairnError(f"name is {len(self.name.encode('utf-8'))} bytes long, too long for checkpoint file names "
                             f"(file systems allow 255 bytes, with the step's suffix): use a --name of at most "
                             f"{MAX_NAME_BYTES} bytes")
        positive(self, None, "seed", zero_ok=True)
        if not self.tokenizer.strip():
            raise CairnError("tokenizer is empty: use 'gpt2', bpe:4096 (learned on the training split) "
                             "or a directory made by `cairn tokenizer train`")
        # only the spec's syntax: a directory is looked for when the run starts, so validating reads no disk
        parse_bpe_spec(self.tokenizer)
        if self.data.seq_len > self.model.context_len:
            raise CairnError(f"data.seq_len ({self.data.seq_len}) is longer than model.context_len "
                             f"({self.model.context_len}): lower seq_len or raise context_len")
        if self.train.lora_rank and self.train.parallel == "fsdp":
            raise CairnError("LoRA (train.lora_rank) is not supported with FSDP: use --parallel ddp (the frozen "
                             "model is small next to full training), or --lora-rank 0")
        if self.train.optimizer == "muon" and self.train.parallel == "fsdp":
            raise CairnError("train.optimizer muon needs whole weight matrices, which FSDP shards: "
                             "use --parallel ddp, or --optimizer adamw with FSDP")


SECTIONS = ("model", "data", "train")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise CairnError naming the field and what to do. Reads nothing from disk."""
    for section in SECTIONS:
        getattr(cfg, section).check()
    cfg.check()
    return cfg


# ---------------------------------------------------------------- setting values by name

def field_index() -> dict[str, tuple[Optional[str], str, Any]]:
    """Every settable key -> (section or None, field name, type). Short names are unique by design."""
    index: dict[str, tuple[Optional[str], str, Any]] = {}
    top = _field_types(RunConfig)
    for name, tp in top.items():
        if name not in SECTIONS:
            index[name] = (None, name, tp)
    for section in SECTIONS:
        for name, tp in _field_types(top[section]).items():
            assert name not in index, f"field name {name} is not unique"
            index[name] = index[f"{section}.{name}"] = (section, name, tp)
    return index


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    if isinstance(value, str):
        value = value.replace("_", "")
        if "e" in value.lower() and float(value).is_integer():  # 1e3, as people write step counts
            return int(float(value))
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    out = float(value)
    if not math.isfinite(out):
        raise ValueError
    return out


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


_PARSERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_EXAMPLES = {int: "a whole number, e.g. 32", float: "a finite number, e.g. 0.001", bool: "true or false",
             str: "text"}


def _coerce(key: str, value: Any, tp: Any, qual: str) -> Any:
    """`value` (CLI text or a TOML value) as the field's type; `key` is the name as the user gave it."""
    choices = _choices(tp)
    if choices is not None:
        check_choice(qual, value, choices)
        return value
    try:
        return _PARSERS[tp](value)
    except (ValueError, TypeError, OverflowError):
        pass
    article = "an" if tp is int else "a"
    raise CairnError(f"{key} must be {article} {tp.__name__}, got {value!r}: give {_EXAMPLES[tp]}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    index = field_index()
    norm = key.replace("-", "_")
    if norm not in index:
        raise CairnError(f"unknown option {key!r}: run `cairn train --help` to see every option")
    section, name, tp = index[norm]
    target = cfg if section is None else getattr(cfg, section)
    setattr(target, name, _coerce(key, value, tp, _qual(section, name)))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return cfg


def from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    flat = {k: v for k, v in d.items() if k not in SECTIONS}
    for section in SECTIONS:
        flat.update({f"{section}.{k}": v for k, v in d.get(section, {}).items()})
    return apply_overrides(cfg, flat)


# ---------------------------------------------------------------- TOML files

def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(cfg.to_dict())


def _read_toml(path: Path) -> dict:
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise CairnError(f"{where} is a directory: pass the path of a .toml file")
    if not path.is_file():
        raise CairnError(f"{where} does not exist: check the path")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CairnError(f"{where} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise CairnError(f"{where} is not valid TOML ({_one_line(e)}): fix the file") from None
    except OSError as e:
        raise CairnError(f"cannot read {where} ({e.strerror or e}): check its permissions") from None


def _flatten(raw: dict) -> dict[str, Any]:
    """A TOML file's settings as `key` / `section.key` overrides, every key checked to exist."""
    index = field_index()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CairnError(f"[{key}] must be a table: put its settings under a [{key}] header")
            for sub, v in value.items():
                if f"{key}.{sub}" not in index:
                    raise CairnError(f"unknown key {key}.{sub}: see `cairn train --help`")
                flat[f"{key}.{sub}"] = v
        elif isinstance(value, dict):
            raise CairnError(f"unknown section [{key}]: use [model], [data] or [train]")
        elif key not in index or index[key][0] is not None:
            raise CairnError(f"unknown top-level key {key!r}: see `cairn train --help`")
        else:
            flat[key] = value
    return flat


def read_toml(path: str | Path) -> dict:
    """A TOML config file's raw table (one-line errors for a missing, unreadable or invalid file)."""
    return _read_toml(Path(path))


def load_toml(path: str | Path, cfg: Optional[RunConfig] = None) -> RunConfig:
    """Apply a TOML file (sections [model], [data], [train]; top-level name/seed/tokenizer) over
    `cfg` (default: the defaults). A `preset = "..."` line is read by `presets.config_file`."""
    path = Path(path)
    raw = _read_toml(path)
    raw.pop("preset", None)
    try:
        return apply_overrides(cfg if cfg is not None else RunConfig(), _flatten(raw))
    except CairnError as e:
        raise CairnError(f"config file {str(path)!r}: {e}") from None


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (the CLI prints every error as one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def describe_options() -> str:
    """Every option with its help text and default, for --help."""
    out = []
    top = _field_types(RunConfig)
    for section, cls in ((None, RunConfig), *((s, top[s]) for s in SECTIONS)):
        if section:
            out.append(f"\n  [{section}]")
        out += [f"  {_flag(f.name):<20} {f.metadata['help']} (default {f.default!r})"
                for f in fields(cls) if "help" in f.metadata]
    return "\n".join(out)
