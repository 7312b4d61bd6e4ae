"""A run's typed configuration, in sections by concern.

A run is one `RunConfig`: a few top-level fields and a section per concern (the model, the data and
its chat template, how much to train, the optimizer, the learning-rate schedule, evaluation,
checkpoints, the time budget, LoRA, the system it runs on, reporting). Each section checks its own
fields (`check`); `RunConfig.check` holds the rules that span sections. Every field carries its
help text, which `cairn train --help` prints, so this file is also the reference for every option.
A field with a fixed set of values is typed `Literal[...]`: the allowed values are read from the
type when a value is set and when a config is validated. Field names are unique across sections,
so `--key value` and the flat keys of older config files name one field each (`config.io`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cairn.config.rules import below_one, budget_seconds, check_choices, opt, positive
from cairn.tokenizer.base import parse_bpe_spec
from cairn.trackers.base import NAMES as TRACKERS
from cairn.util.errors import CairnError, option

# A bpe:N tokenizer's learning sample: it bounds the learning's time and memory on any corpus, and
# keeps every story of the shared 4 MB sample. On a 2-core AMD EPYC (avx512_bf16), a 64 MB sample of
# the shared sample 100x (405 MB, benchmarks/scripts/scale_corpus.py) took 15.5 s at 148 MB peak
# RSS; the whole training split of such a corpus took 43.5 s, in a command of 0.94 GB peak.
TOKENIZER_SAMPLE_BYTES = 64_000_000
# Under a time budget, the end's validation scores at most this many batches: above the whole
# validation split of cpu-10min on the shared sample (50 batches of 4 x 256 tokens), so its runs
# still end on the whole split, while a big corpus's end costs what 100 batches cost.
END_VAL_BATCHES = 100


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
                             f"change {option('model.d_model')} or {option('model.n_heads')}")
        if self.d_model // self.n_heads % 2:
            raise CairnError(f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even: "
                             f"change {option('model.d_model')} or {option('model.n_heads')}")
        if not 0 <= self.dropout < 1:
            raise CairnError(f"model.dropout must be in [0, 1), got {self.dropout}: set {option('model.dropout')} to "
                             "e.g. 0.1")


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
    tokenizer_sample_bytes: int = opt(
        TOKENIZER_SAMPLE_BYTES, "a bpe:N tokenizer learns on a seeded random sample of about this many bytes of "
                                "the training split, streamed from the source (0 = the whole split)")
    format: Literal["text", "sft"] = opt(
        "text", '"text": stories; "sft": JSONL instruction records (prompt/response or messages), the loss on '
                "the responses only")
    prompt_field: str = opt("prompt", "sft: field holding the instruction")
    response_field: str = opt("response", "sft: field holding the answer")
    messages_field: str = opt("messages", 'sft: field holding a conversation, a list of {"role", "content"}')

    def check(self) -> None:
        check_choices(self, "data")
        positive(self, "data", "n_samples tokenizer_sample_bytes", zero_ok=True)
        positive(self, "data", "seq_len")
        if not (0 < self.train_frac <= 1) or not (0 <= self.val_frac < 1):
            raise CairnError(f"data.train_frac must be in (0, 1] and data.val_frac in [0, 1), "
                             f"got {self.train_frac} and {self.val_frac}: change {option('data.train_frac')} / "
                             f"{option('data.val_frac')}")
        if self.train_frac + self.val_frac > 1 + 1e-9:
            raise CairnError(f"data.train_frac + data.val_frac = {self.train_frac + self.val_frac:g} is over 1: "
                             "the fractions must sum to at most 1 (the rest is the test split)")
        if self.pack_shift and self.batching != "pack":
            raise CairnError("data.pack_shift is for packed rows (pad batching does not cut the stream into "
                             f"windows): use {option('data.batching')} pack, or {option('data.pack_shift')} false")
        if self.story_mask and self.batching != "pack":
            raise CairnError("data.story_mask is for packed rows (pad batching gives each story a row of its own): "
                             f"use {option('data.batching')} pack, or {option('data.story_mask')} false")
        if not self.source:
            raise CairnError(f"data.source is empty: pass {option('data.source')} PATH_OR_HUB_ID")
        if self.format == "sft":
            if self.batching == "pack" and not self.story_mask:
                raise CairnError("data.format sft packs whole examples into rows, which must not attend to each "
                                 f"other: add {option('data.story_mask')} true, or use {option('data.batching')} pad")
            if self.pack_shift:
                raise CairnError("data.pack_shift cuts a token stream, and sft rows hold whole examples: "
                                 f"use {option('data.pack_shift')} false")


class Section(Protocol):
    def check(self) -> None: ...


@dataclass
class ChatConfig:
    """The chat template that renders conversations into text, for training, chat and serving alike."""
    template_system: str = opt("{content}\n", "chat template: a system turn ({content} is its text)")
    template_user: str = opt("User: {content}\n", "chat template: a user turn")
    template_assistant: str = opt("Assistant: {content}", "chat template: an assistant turn (the text before "
                                                          "{content} ends every prompt)")
    template_separator: str = opt("\n", "chat template: written after an assistant turn that is not the last")

    def check(self) -> None:
        from cairn.tokenizer.chat_template import ChatTemplate

        ChatTemplate.from_config(self)


@dataclass
class TrainConfig:
    """How much to train, and in what batches."""
    batch_size: int = opt(32, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    epochs: int = opt(1, "passes over the training split")
    max_steps: int = opt(
        0, "cap on optimizer steps (0 = as many as the epochs give); the schedule is planned for it")

    def check(self) -> None:
        positive(self, "train", "batch_size grad_accum epochs")
        positive(self, "train", "max_steps", zero_ok=True)


@dataclass
class OptimConfig:
    """The optimizer and what guards its steps."""
    optimizer: Literal["adamw", "muon"] = opt(
        "adamw", '"adamw", or "muon": Muon for the blocks\' weight matrices, AdamW for embeddings, head, norms and '
                 "biases (one lr)")
    muon_momentum: float = opt(0.95, "Muon's (Nesterov) momentum")
    embed_lr_scale: float = opt(1.0, "the token embedding's learning rate as a multiple of lr (and min_lr)")
    weight_decay: float = opt(0.01, "AdamW weight decay, applied to matrices only (not biases, norms)")
    embed_weight_decay: float = opt(-1.0, "the token embedding's weight decay (-1 = weight_decay)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    skip_nonfinite: int = opt(0, "skip up to N updates whose loss or gradient is NaN/inf (0 = stop at the first)")

    def check(self) -> None:
        check_choices(self, "optim")
        positive(self, "optim", "eps")
        positive(self, "optim", "weight_decay grad_clip skip_nonfinite", zero_ok=True)
        below_one(self, "optim", "beta1 beta2 muon_momentum")
        if not (math.isfinite(self.embed_lr_scale) and self.embed_lr_scale > 0):
            raise CairnError(f"optim.embed_lr_scale must be a positive number, got {self.embed_lr_scale}: "
                             f"change {option('optim.embed_lr_scale')} (1 = the same lr as everything else)")
        wd = self.embed_weight_decay
        if not (wd == -1 or (math.isfinite(wd) and wd >= 0)):
            raise CairnError(f"optim.embed_weight_decay must be >= 0 (or -1 for weight_decay's), got "
                             f"{wd}: change {option('optim.embed_weight_decay')}")


@dataclass
class ScheduleConfig:
    """The learning rate over the run: warm-up, peak, decay."""
    lr: float = opt(5e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of the decay")
    schedule: Literal["linear", "cosine", "constant"] = opt(
        "linear", 'after warm-up: "linear" decay (the tutorial\'s), "cosine", or "constant"')
    warmup_steps: int = opt(-1, "warm-up length in optimizer steps (-1 = use warmup_frac)")
    warmup_frac: float = opt(0.05, "warm-up as a fraction of all steps (1.0 = the whole run, the tutorial's)")

    def check(self) -> None:
        check_choices(self, "schedule")
        positive(self, "schedule", "lr")
        positive(self, "schedule", "min_lr", zero_ok=True)
        if self.min_lr > self.lr:
            raise CairnError(f"schedule.min_lr ({self.min_lr}) is above schedule.lr ({self.lr}): "
                             f"lower {option('schedule.min_lr')} or raise {option('schedule.lr')}")
        if self.warmup_steps < -1:
            raise CairnError(f"schedule.warmup_steps must be -1 (use warmup_frac) or zero or more, "
                             f"got {self.warmup_steps}: change {option('schedule.warmup_steps')}")
        if not 0 <= self.warmup_frac <= 1:
            raise CairnError(f"schedule.warmup_frac must be in [0, 1], got {self.warmup_frac}: change "
                             f"{option('schedule.warmup_frac')}")


@dataclass
class EvalConfig:
    """Validation during the run, early stopping, and what the run's end scores and writes."""
    eval_every: int = opt(0, "validate every N steps (0 = only at each epoch end)")
    eval_batches: int = opt(0, "validation batches in the periodic evaluations (0 = all); epoch ends use all "
                               'unless epoch_val = "sample"')
    epoch_val: Literal["full", "sample"] = opt(
        "full", 'validation at each epoch\'s end: "full" split, or "sample" (eval_batches, as eval_every\'s)')
    patience: int = opt(5, "stop after this many evaluations without a better validation loss (0 = never)")
    test_at_end: bool = opt(True, "evaluate the test split at the end of training")
    end_on_best: bool = opt(True, "when the best validated weights of the run validate better on the whole split "
                                  "than the last ones, end on them (the last state stays resumable)")
    end_stories: int = opt(3, "stories generated from fixed prompts and seeds at the end, printed and saved to "
                              "RUN/stories.md")
    end_story_tokens: int = opt(200, "longest end-of-run story in tokens")
    end_val_batches: int = opt(
        END_VAL_BATCHES, "under a time budget: the most batches a validation of the whole split scores (the run's "
                         "end and end_on_best's comparison, epoch ends with epoch_val = \"full\", eval_batches = 0), "
                         "so that the end's cost does not grow with the data; 0 = the whole split. Without a budget "
                         "the whole split is scored")
    end_test_batches: int = opt(
        END_VAL_BATCHES, "under a time budget: the most batches the final test scores, a fixed seeded sample of "
                         "the test split (the same rows in every run with the same data and seed), so that the "
                         "run ends within its budget at any corpus size; 0 = the whole split, scored after the "
                         "budget's end when it does not fit. Without a budget the whole split is scored")
    stride: int = opt(
        0, "held-out scoring of a story longer than data.seq_len: windows of seq_len inputs, each scoring the next "
           "`stride` targets with the inputs before them as context (0 = seq_len // 2: every target has at least "
           "half a window of context and each input is run about twice; seq_len: no overlap, each input run once, "
           "less context at each window's start)")

    def check(self) -> None:
        check_choices(self, "eval")
        positive(self, "eval", "end_story_tokens")
        positive(self, "eval", "eval_every eval_batches patience end_stories end_val_batches end_test_batches stride",
                 zero_ok=True)


@dataclass
class CheckpointConfig:
    """When a run saves, and how many step checkpoints it keeps."""
    checkpoint_every: int = opt(50, "save a step checkpoint every N steps (0 = none)")
    keep_checkpoints: int = opt(0, "keep only the newest K step checkpoints (0 = keep all)")

    def check(self) -> None:
        positive(self, "checkpoint", "checkpoint_every keep_checkpoints", zero_ok=True)


@dataclass
class BudgetConfig:
    """A wall-clock budget for the whole command, and what spare compute buys."""
    time_budget: str = opt("", 'e.g. "10m", "90s", "1.5h": measure, then plan the steps so the whole run '
                               "(evaluations and stories included) ends within it, but for a test split of more than "
                               "eval.end_val_batches, scored after it; epochs is then ignored, max_steps still "
                               'caps; "", 0 or off = no budget')
    grow_to_epochs: float = opt(
        0.0, "under a time budget: when more than this many epochs of the training split would fit, train a wider "
             "model that takes about this many instead (0 = never; docs/training.md)")

    @property
    def seconds(self) -> float | None:
        """The budget in seconds, None when there is none."""
        return budget_seconds(self.time_budget)

    def check(self) -> None:
        positive(self, "budget", "grow_to_epochs", zero_ok=True)
        budget_seconds(self.time_budget)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of training every weight."""
    lora_rank: int = opt(0, "LoRA (peft): train rank-R adapters on --lora-targets, the model frozen (0 = off: "
                            "train every weight)")
    lora_alpha: float = opt(16.0, "LoRA scale: the adapters' update is multiplied by lora_alpha / lora_rank")
    lora_targets: str = opt("", "LoRA: comma-separated names of the linear layers to adapt, by last name (qkv, "
                                "proj, fc, gate, up, lm_head) or full path (\"\" = every linear of the blocks)")

    def check(self) -> None:
        positive(self, "lora", "lora_rank", zero_ok=True)
        positive(self, "lora", "lora_alpha")


@dataclass
class SystemConfig:
    """Where and how the run computes: device, precision, threads, compilation, processes."""
    device: str = opt("auto", '"auto" (cuda, then mps, then cpu), or a torch device string')
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", '"auto" (bf16 autocast on GPUs that have it, and on CPUs with native bf16 where the run\'s matmuls '
                'measure faster in it: docs/precision.md), "fp32" or "bf16"')
    compile: bool = opt(False, "torch.compile the model")
    num_threads: int = opt(0, "CPU threads for torch (0 = one per core)")
    num_workers: int = opt(0, "DataLoader worker processes")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", 'under torchrun: "ddp" (a copy per process) or "fsdp" (parameters and optimizer state sharded)')
    dist_timeout_s: int = opt(600, "under torchrun: seconds to wait for the other ranks before the job fails")

    def check(self) -> None:
        check_choices(self, "system")
        positive(self, "system", "dist_timeout_s")
        positive(self, "system", "num_threads num_workers", zero_ok=True)


@dataclass
class ReportConfig:
    """What a run reports while it trains, and where."""
    report_every: int = opt(5, "log train loss every N steps")
    tensorboard: bool = opt(False, "also log metrics to RUN/tensorboard/ (pip install 'cairn-lm[tensorboard]'); "
                                   'the same as "tensorboard" in trackers')
    trackers: tuple[str, ...] = opt((), "experiment trackers fed the metrics, config, precision and plan, comma-"
                                        f"separated or a list: any of {', '.join(TRACKERS)}")

    def check(self) -> None:
        positive(self, "report", "report_every", zero_ok=True)
        for name in self.trackers:
            if name not in TRACKERS:
                raise CairnError(f"report.trackers: unknown tracker {name!r}: set {option('report.trackers')} to "
                                 f"any of {', '.join(TRACKERS)}, comma-separated")

    def tracker_names(self) -> list[str]:
        """The trackers the run feeds, each once, in the order given (`tensorboard = true` adds TensorBoard)."""
        names = list(self.trackers) + (["tensorboard"] if self.tensorboard else [])
        return list(dict.fromkeys(names))


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
    chat: ChatConfig = field(default_factory=ChatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sections(self) -> list[tuple[str, Section]]:
        return [(name, getattr(self, name)) for name in SECTIONS]

    def check(self) -> None:
        """The top-level fields and the rules that span sections."""
        if not self.name or self.name != self.name.strip() or any(c in self.name for c in "/\\\0") \
                or self.name in (".", ".."):
            raise CairnError(f"name {self.name!r} cannot name checkpoint files: "
                             "use letters, digits, '-', '_' or '.' (no path separators)")
        if len(self.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise CairnError(f"name is {len(self.name.encode('utf-8'))} bytes long, too long for checkpoint file names "
                             f"(file systems allow 255 bytes, with the step's suffix): use a {option('name')} of at "
                             "most "
                             f"{MAX_NAME_BYTES} bytes")
        positive(self, None, "seed", zero_ok=True)
        if not self.tokenizer.strip():
            raise CairnError("tokenizer is empty: use 'gpt2', bpe:4096 (learned on the training split) "
                             "or a directory made by `cairn tokenizer train`")
        # only the spec's syntax: a directory is looked for when the run starts, so validating reads no disk
        parse_bpe_spec(self.tokenizer)
        if self.eval.stride > self.data.seq_len:
            raise CairnError(f"eval.stride ({self.eval.stride}) is longer than data.seq_len ({self.data.seq_len}): "
                             f"set {option('eval.stride')} to at most seq_len, or 0 for half of it")
        if self.data.seq_len > self.model.context_len:
            raise CairnError(f"data.seq_len ({self.data.seq_len}) is longer than model.context_len "
                             f"({self.model.context_len}): lower seq_len or raise context_len")
        if self.lora.lora_rank and self.system.parallel == "fsdp":
            raise CairnError(f"LoRA (lora.lora_rank) is not supported with FSDP: use {option('system.parallel')} ddp "
                             "(the frozen "
                             f"model is small next to full training), or {option('lora.lora_rank')} 0")
        if self.optim.optimizer == "muon" and self.system.parallel == "fsdp":
            raise CairnError("optim.optimizer muon needs whole weight matrices, which FSDP shards: "
                             f"use {option('system.parallel')} ddp, or {option('optim.optimizer')} adamw with FSDP")


SECTIONS = ("model", "data", "chat", "train", "optim", "schedule", "eval", "checkpoint", "budget", "lora", "system",
            "report")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise CairnError naming the field and what to do. Reads nothing from disk."""
    for _, section in cfg.sections():
        section.check()
    cfg.check()
    return cfg
