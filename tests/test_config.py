import os
import re
import pytest

import subprocess
import sys
import typing
from pathlib import Path

from cairn.config.io import apply_overrides, describe_options, field_index, from_dict, load_toml, to_toml
from cairn.config.sections import (SECTIONS, BudgetConfig, DataConfig, ModelConfig, OptimConfig, RunConfig,
                                   ScheduleConfig, SystemConfig, validate)
from cairn.util.errors import CairnError
from cairn.config.presets import PRESETS, config_file, preset

# every value of every preset: a refactoring must not change one (docs/presets.md says why they are so)
PRESET_VALUES = {
    "reference-105m": dict(
        name="autoregressive-105m", seed=42, tokenizer="gpt2",
        model=dict(vocab_size=50257, d_model=768, n_layers=4, n_heads=12, d_mlp=3072, context_len=1000, bias=True,
            dropout=0.0, norm_eps=1e-05, tie_embeddings=False, positions="sinusoidal", rope_theta=10000.0,
            norm="layernorm", mlp="gelu", zero_init=False),
        data=dict(source="roneneldan/TinyStories", hub_split="train", text_field="text", txt_separator="<|endoftext|>",
            n_samples=100, train_frac=0.8, val_frac=0.1, batching="pad", seq_len=1000, story_mask=False,
            pack_shift=False, cache_dir=""),
        train=dict(batch_size=32, grad_accum=1, epochs=1, max_steps=0, optimizer="adamw", muon_momentum=0.95, lr=0.0005,
            min_lr=0.0, embed_lr_scale=1.0, schedule="linear", warmup_steps=-1, warmup_frac=0.05, weight_decay=0.01,
            embed_weight_decay=-1.0, beta1=0.9, beta2=0.999, eps=1e-08, grad_clip=1.0, report_every=5, eval_every=0,
            eval_batches=0, epoch_val="full", patience=5, checkpoint_every=50, keep_checkpoints=0, device="auto",
            precision="auto", compile=False, num_threads=0, num_workers=0, test_at_end=True, end_on_best=False,
            tensorboard=False,
            skip_nonfinite=0, time_budget="", grow_to_epochs=0.0,
            end_stories=3, end_story_tokens=200, parallel="ddp",
            dist_timeout_s=600),
    ),
    "cpu-small": dict(
        name="cpu-small", seed=42, tokenizer="gpt2",
        model=dict(vocab_size=50257, d_model=192, n_layers=4, n_heads=6, d_mlp=768, context_len=256, bias=True,
            dropout=0.0, norm_eps=1e-05, tie_embeddings=True, positions="sinusoidal", rope_theta=10000.0,
            norm="layernorm", mlp="gelu", zero_init=False),
        data=dict(source="roneneldan/TinyStories", hub_split="train", text_field="text", txt_separator="<|endoftext|>",
            n_samples=0, train_frac=0.9, val_frac=0.05, batching="pack", seq_len=256, story_mask=False,
            pack_shift=False, cache_dir=""),
        train=dict(batch_size=4, grad_accum=1, epochs=1, max_steps=360, optimizer="adamw", muon_momentum=0.95, lr=0.003,
            min_lr=0.0003, embed_lr_scale=1.0, schedule="cosine", warmup_steps=-1, warmup_frac=0.03,
            weight_decay=0.1, embed_weight_decay=-1.0, beta1=0.9, beta2=0.95, eps=1e-08, grad_clip=1.0,
            report_every=10, eval_every=60, eval_batches=8, epoch_val="full", patience=0, checkpoint_every=120,
            keep_checkpoints=2, device="auto", precision="auto", compile=False, num_threads=0, num_workers=0,
            test_at_end=True, end_on_best=True, tensorboard=False, skip_nonfinite=0, time_budget="", grow_to_epochs=0.0,
            end_stories=3,
            end_story_tokens=200, parallel="ddp", dist_timeout_s=600),
    ),
    "cpu-10min": dict(
        name="cpu-10min", seed=42, tokenizer="bpe:4096",
        model=dict(vocab_size=4096, d_model=128, n_layers=3, n_heads=2, d_mlp=352, context_len=256, bias=False,
            dropout=0.0, norm_eps=1e-05, tie_embeddings=False, positions="rope", rope_theta=10000.0, norm="rmsnorm",
            mlp="swiglu", zero_init=False),
        data=dict(source="roneneldan/TinyStories", hub_split="train", text_field="text", txt_separator="<|endoftext|>",
            n_samples=0, train_frac=0.9, val_frac=0.05, batching="pack", seq_len=256, story_mask=True,
            pack_shift=False, cache_dir=""),
        train=dict(batch_size=4, grad_accum=1, epochs=1, max_steps=0, optimizer="adamw", muon_momentum=0.95, lr=0.0025,
            min_lr=0.0, embed_lr_scale=10.0, schedule="linear", warmup_steps=-1, warmup_frac=0.03, weight_decay=0.1,
            embed_weight_decay=-1.0, beta1=0.9, beta2=0.999, eps=1e-08, grad_clip=1.0, report_every=50,
            eval_every=500, eval_batches=8, epoch_val="sample", patience=0, checkpoint_every=500,
            keep_checkpoints=2, device="auto", precision="auto", compile=True, num_threads=0, num_workers=0,
            test_at_end=True, end_on_best=True, tensorboard=False, skip_nonfinite=0, time_budget="10m",
            grow_to_epochs=10.0, end_stories=3, end_story_tokens=300, parallel="ddp", dist_timeout_s=600),
    ),
    "tiny": dict(
        name="tiny", seed=42, tokenizer="gpt2",
        model=dict(vocab_size=50257, d_model=64, n_layers=2, n_heads=4, d_mlp=256, context_len=128, bias=True,
            dropout=0.0, norm_eps=1e-05, tie_embeddings=False, positions="sinusoidal", rope_theta=10000.0,
            norm="layernorm", mlp="gelu", zero_init=False),
        data=dict(source="roneneldan/TinyStories", hub_split="train", text_field="text", txt_separator="<|endoftext|>",
            n_samples=1000, train_frac=0.8, val_frac=0.1, batching="pack", seq_len=64, story_mask=False,
            pack_shift=False, cache_dir=""),
        train=dict(batch_size=8, grad_accum=1, epochs=1, max_steps=0, optimizer="adamw", muon_momentum=0.95, lr=0.003,
            min_lr=0.0, embed_lr_scale=1.0, schedule="cosine", warmup_steps=-1, warmup_frac=0.1, weight_decay=0.1,
            embed_weight_decay=-1.0, beta1=0.9, beta2=0.95, eps=1e-08, grad_clip=1.0, report_every=5, eval_every=20,
            eval_batches=5, epoch_val="full", patience=5, checkpoint_every=20, keep_checkpoints=0, device="auto",
            precision="auto", compile=False, num_threads=0, num_workers=0, test_at_end=True, end_on_best=True,
            tensorboard=False,
            skip_nonfinite=0, time_budget="", grow_to_epochs=0.0,
            end_stories=1, end_story_tokens=32, parallel="ddp",
            dist_timeout_s=600),
    ),
}

# the fine-tuning settings (--init-from, --format sft and its template, LoRA) at their defaults in every
# preset above; cpu-instruct is cpu-10min's model tuned on instruction records
FINETUNE_DEFAULTS = dict(
    top=dict(init_from=""),
    data=dict(format="text", prompt_field="prompt", response_field="response", messages_field="messages",
              template_system="{content}\n", template_user="User: {content}\n",
              template_assistant="Assistant: {content}", template_separator="\n"),
    train=dict(lora_rank=0, lora_alpha=16.0, lora_targets=""),
)
for _values in PRESET_VALUES.values():
    _values.update(FINETUNE_DEFAULTS["top"])
    _values["data"].update(FINETUNE_DEFAULTS["data"])
    _values["train"].update(FINETUNE_DEFAULTS["train"])
PRESET_VALUES["cpu-instruct"] = dict(
    name="cpu-instruct", seed=42, tokenizer="bpe:4096", init_from="", model=PRESET_VALUES["cpu-10min"]["model"],
    data={**PRESET_VALUES["cpu-10min"]["data"], "format": "sft", "train_frac": 0.98, "val_frac": 0.02},
    train={**PRESET_VALUES["cpu-10min"]["train"], "lr": 0.002, "embed_lr_scale": 1.0, "time_budget": "5m",
           "compile": False, "report_every": 25, "eval_every": 0, "checkpoint_every": 200, "test_at_end": False,
           "end_stories": 1, "end_story_tokens": 200, "grow_to_epochs": 0.0},
)


def test_reference_preset_has_the_tutorials_hyperparameters():
    c = preset("reference-105m")
    assert (c.model.vocab_size, c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_mlp,
            c.model.context_len) == (50257, 768, 4, 12, 3072, 1000)
    assert (c.data.n_samples, c.data.train_frac, c.data.val_frac, c.data.batching) == (100, 0.8, 0.1, "pad")
    assert (c.train.batch_size, c.schedule.lr, c.optim.grad_clip, c.eval.patience, c.report.report_every,
            c.checkpoint.checkpoint_every, c.train.epochs) == (32, 5e-4, 1.0, 5, 5, 50, 1)
    assert c.schedule.schedule == "linear" and c.schedule.warmup_frac < 1.0  # not the whole run
    assert c.seed == 42
    validate(c)


def test_overrides_short_dotted_and_dashed():
    c = apply_overrides(preset("cpu-small"), {"lr": "1e-3", "model.d_model": "128", "n-heads": "4",
                                              "compile": "true", "batching": "pad"})
    assert c.schedule.lr == 1e-3 and c.model.d_model == 128 and c.model.n_heads == 4 and c.system.compile is True
    assert c.data.batching == "pad"


@pytest.mark.parametrize("key,value,match", [
    ("nope", "1", "unknown option"),
    ("lr", "fast", "must be a float"),
    ("batch_size", "2.5", "must be an int"),
    ("compile", "maybe", "must be a bool"),
])
def test_bad_overrides(key, value, match):
    with pytest.raises(CairnError, match=match):
        apply_overrides(RunConfig(), {key: value})


@pytest.mark.parametrize("changes,match", [
    ({"n_heads": 5}, "divisible"),
    ({"seq_len": 2000}, "longer than model.context_len"),
    ({"train_frac": 0.8, "val_frac": 0.3}, "sum to at most 1"),
    ({"lr": -1.0}, "positive"),
    ({"batch_size": 0}, "positive"),
    ({"batching": "pad", "story_mask": True}, "story_mask is for packed rows"),
    ({"batching": "pad", "pack_shift": True}, "pack_shift is for packed rows"),
    ({"embed_weight_decay": -0.5}, "embed_weight_decay must be >= 0"),
])
def test_validation_errors(changes, match):
    c = apply_overrides(RunConfig(), changes)
    with pytest.raises(CairnError, match=match):
        validate(c)


def test_toml_round_trip_and_file_errors(tmp_path):
    c = apply_overrides(preset("cpu-small"), {"lr": 0.002, "source": 'a "quoted" path'})
    f = tmp_path / "c.toml"
    f.write_text(to_toml(c))
    assert load_toml(f, RunConfig()) == c
    assert from_dict(c.to_dict()) == c
    f.write_text("[train]\nlr = 'high'\n")
    with pytest.raises(CairnError, match="schedule.lr must be a float"):
        load_toml(f)
    f.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(CairnError, match="unknown key train.learning_rate"):
        load_toml(f)
    f.write_text("preset = 'cpu-small'\n[model]\nd_model = 512\n")
    assert config_file(f).model.d_model == 512 and config_file(f).name == "cpu-small"
    assert load_toml(f).name == RunConfig().name  # the preset line is config_file's to read
    with pytest.raises(CairnError, match="unknown preset"):
        preset("gpt5")


def test_every_preset_is_valid_and_cpu_10min_is_the_measured_one():
    from cairn.model.transformer import Transformer

    for name in PRESETS:
        validate(preset(name))
    c = preset("cpu-10min")
    # the settings docs/experiments.md measured; the run's time budget plans the steps
    assert c.tokenizer == "bpe:4096" and c.budget.time_budget == "10m" and c.eval.end_stories == 3 and c.system.compile
    assert (c.model.positions, c.model.norm, c.model.mlp, c.model.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert (c.model.d_model, c.model.n_layers, c.model.tie_embeddings) == (128, 3, False)
    assert (c.train.batch_size, c.schedule.lr, c.optim.embed_lr_scale, c.optim.beta2) == (4, 2.5e-3, 10.0, 0.999)
    assert c.data.val_frac > 0  # scored on a validation split it never trains on
    assert c.data.story_mask and c.eval.epoch_val == "sample"
    c.model.vocab_size = 4096
    assert Transformer(c.model).num_params() == 1_651_584


def test_presets_keep_their_values():
    assert set(PRESETS) == set(PRESET_VALUES)
    for name, expected in PRESET_VALUES.items():
        # the values as a flat [model] [data] [train] table, the layout before the sections by concern
        assert from_dict(expected) == preset(name), name


CHOICES = {
    "positions": ("model", ("sinusoidal", "rope")),
    "norm": ("model", ("layernorm", "rmsnorm")),
    "mlp": ("model", ("gelu", "swiglu")),
    "batching": ("data", ("pack", "pad")),
    "format": ("data", ("text", "sft")),
    "optimizer": ("optim", ("adamw", "muon")),
    "schedule": ("schedule", ("linear", "cosine", "constant")),
    "epoch_val": ("eval", ("full", "sample")),
    "precision": ("system", ("auto", "fp32", "bf16")),
    "parallel": ("system", ("ddp", "fsdp")),
}


def test_choice_fields_are_literals_and_device_is_free_text():
    index = field_index()
    literals = {name: (section, typing.get_args(tp)) for name, (section, _, tp) in index.items()
                if "." not in name and typing.get_origin(tp) is typing.Literal}
    assert literals == CHOICES
    assert index["device"][2] is str
    assert apply_overrides(RunConfig(), {"device": "cuda:1"}).system.device == "cuda:1"


@pytest.mark.parametrize("key,value,message", [
    ("positions", "alibi", "model.positions must be 'sinusoidal' or 'rope', got 'alibi': "
                           "set --positions to one of them"),
    ("model.norm", "batchnorm", "model.norm must be 'layernorm' or 'rmsnorm', got 'batchnorm': "
                                "set --norm to one of them"),
    ("batching", "bucket", "data.batching must be 'pack' or 'pad', got 'bucket': set --batching to one of them"),
    ("schedule", "step", "schedule.schedule must be 'linear', 'cosine' or 'constant', got 'step': "
                         "set --schedule to one of them"),
    ("precision", "fp16", "system.precision must be 'auto', 'fp32' or 'bf16', got 'fp16': "
                          "set --precision to one of them"),
    ("epoch-val", "some", "eval.epoch_val must be 'full' or 'sample', got 'some': set --epoch-val to one of them"),
    ("optimizer", "Muon", "optim.optimizer must be 'adamw' or 'muon', got 'Muon'"),
    ("parallel", 1, "system.parallel must be 'ddp' or 'fsdp', got 1"),
])
def test_a_choice_outside_its_literal_is_refused_when_set(key, value, message):
    with pytest.raises(CairnError) as e:
        apply_overrides(RunConfig(), {key: value})
    # the command line names the flag; a Python caller is told the setting, in the config's own words
    assert e.value.for_cli().startswith(message) and "\n" not in str(e.value)
    assert "--" not in str(e.value) and "set " + message.split(" must ")[0] in str(e.value)


def test_every_choice_value_is_accepted(tmp_path):
    for name, (section, values) in CHOICES.items():
        for value in values:
            assert getattr(getattr(apply_overrides(RunConfig(), {name: value}), section), name) == value
    f = tmp_path / "c.toml"
    f.write_text('[model]\npositions = "alibi"\n', encoding="utf-8")
    with pytest.raises(CairnError) as e:
        load_toml(f)
    assert re.search(r"config file .*: model\.positions must be 'sinusoidal' or 'rope', got 'alibi': set --positions "
                     r"to one of them", e.value.for_cli())


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_choice_outside_its_literal_is_refused_by_validate(name):
    section, values = CHOICES[name]
    cfg = RunConfig()
    setattr(getattr(cfg, section), name, "nonsense")  # set in Python, past the coercion
    expected = f"{section}.{name} must be {', '.join(map(repr, values[:-1]))} or {values[-1]!r}, " \
               f"got 'nonsense': set --{name.replace('_', '-')} to one of them"
    for check in (lambda: validate(cfg), getattr(cfg, section).check):
        with pytest.raises(CairnError) as e:
            check()
        assert e.value.for_cli() == expected


@pytest.mark.parametrize("section,match", [
    (ModelConfig(n_heads=5), r"model\.d_model \(768\) must be divisible by model\.n_heads \(5\)"),
    (ModelConfig(d_model=12, n_heads=4), r"head size d_model/n_heads = 3 must be even"),
    (ModelConfig(dropout=1.0), r"model\.dropout must be in \[0, 1\), got 1\.0: set --dropout to e\.g\. 0\.1"),
    (ModelConfig(norm_eps=0.0), r"model\.norm_eps must be positive, got 0\.0: set --norm-eps to a positive value"),
    (DataConfig(n_samples=-1), r"data\.n_samples must be zero or more, got -1: set --n-samples to 0 or more"),
    (DataConfig(batching="pad", story_mask=True), r"data\.story_mask is for packed rows"),
    (DataConfig(source=""), r"data\.source is empty"),
    (ScheduleConfig(min_lr=0.1, lr=0.01), r"schedule\.min_lr \(0\.1\) is above schedule\.lr \(0\.01\)"),
    (OptimConfig(beta2=1.0), r"optim\.beta2 must be in \[0, 1\), got 1\.0: change --beta2"),
    (OptimConfig(muon_momentum=-0.1), r"optim\.muon_momentum must be in \[0, 1\), got -0\.1: change --muon-momentum"),
    (ScheduleConfig(warmup_steps=-2), r"schedule\.warmup_steps must be -1"),
    (BudgetConfig(time_budget="soon"), r"budget\.time_budget 'soon' is not a duration"),
    (SystemConfig(dist_timeout_s=0), r"system\.dist_timeout_s must be positive"),
    (RunConfig(seed=-1), r"^seed must be zero or more, got -1: set --seed to 0 or more$"),
    (RunConfig(name="a/b"), r"cannot name checkpoint files"),
    (RunConfig(tokenizer=""), r"tokenizer is empty"),
    (RunConfig(tokenizer="bpe:12"), r"must be bpe:N with N from 257"),
    (RunConfig(data=DataConfig(seq_len=2000)), r"data\.seq_len \(2000\) is longer than model\.context_len \(1000\)"),
    (RunConfig(optim=OptimConfig(optimizer="muon"), system=SystemConfig(parallel="fsdp")),
     r"muon needs whole weight matrices"),
])
def test_each_section_checks_itself(section, match):
    with pytest.raises(CairnError) as e:
        section.check()
    assert re.search(match, e.value.for_cli()), e.value.for_cli()
    for _, default in RunConfig().sections():
        default.check()
    RunConfig().check()


def test_cross_section_rules_belong_to_the_run_config():
    cfg = RunConfig(data=DataConfig(seq_len=2000), optim=OptimConfig(optimizer="muon"),
                    system=SystemConfig(parallel="fsdp"))
    assert [name for name, _ in cfg.sections()] == list(SECTIONS)
    for _, section in cfg.sections():
        section.check()  # each section alone is fine
    with pytest.raises(CairnError, match="longer than model.context_len"):
        validate(cfg)


def test_validate_reads_no_disk(tmp_path, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("validate touched the disk")

    cfgs = [RunConfig(tokenizer=spec) for spec in ("gpt2", "bpe:4096", str(tmp_path / "no-such-tokenizer"))]
    cfgs[-1].data.source = str(tmp_path / "no-such-data.jsonl")
    with monkeypatch.context() as m:  # undone before a failure is reported (the report reads files)
        for module, name in ((Path, "stat"), (os, "stat"), (os, "scandir")):
            m.setattr(module, name, no_disk)
        checked = [validate(cfg) for cfg in cfgs]
    assert checked == cfgs


def test_toml_round_trip_of_awkward_strings(tmp_path):
    awkward = 'say "hi" \'there\' C:\\runs\\ \\n line\nbreak\ttab\r\n \x00\x01\x1b\x7f \u0085\u2028\ufeff é 😀 """'
    cfg = RunConfig(name=awkward, tokenizer=awkward)
    for key in ("source", "text_field", "txt_separator", "cache_dir", "device", "time_budget", "hub_split"):
        apply_overrides(cfg, {key: awkward + key})
    text = to_toml(cfg)
    f = tmp_path / "c.toml"
    f.write_text(text, encoding="utf-8")
    assert load_toml(f, RunConfig()) == cfg
    assert load_toml(f, RunConfig()).to_dict() == cfg.to_dict()
    assert from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_choices():
    with pytest.raises(CairnError, match=r"^unknown preset 'huge': choose one of cpu-10min, cpu-instruct, "
                                         r"cpu-small, reference-105m, tiny$"):
        preset("huge")
    assert preset("tiny") is not preset("tiny")  # a fresh copy each time: changing one changes no other


def test_help_lists_every_option_with_its_help_and_default():
    text = describe_options()
    for name, (section, field_name, _) in field_index().items():
        if "." in name:
            continue
        owner = RunConfig() if section is None else getattr(RunConfig(), section)
        line = next(line for line in text.splitlines() if line.split()[:1] == ["--" + name.replace("_", "-")])
        assert line.endswith(f"(default {getattr(owner, field_name)!r})"), line
        assert len(line.split()) > 3, line  # a help text between the flag and the default
    assert "--d-model            width of the residual stream (the embedding size) (default 768)" in text


def test_config_imports_neither_presets_nor_data_nor_the_tokenizer_trainer():
    src = str(Path(__import__("cairn").__file__).parents[1])
    code = "import sys, cairn.config.sections; print(' '.join(sorted(m for m in sys.modules if m.startswith('cairn'))))"
    env = {**os.environ, "PYTHONPATH": src}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout.split()
    assert "cairn.config.sections" in loaded
    for module in ("cairn.config.presets", "cairn.data", "cairn.tokenizer.learn"):
        assert module not in loaded


def test_coercion_of_plain_types():
    cfg = apply_overrides(RunConfig(), {"max_steps": "1e3", "eval_every": "1_000", "compile": "on", "bias": "no",
                                        "lr": "3e-4", "warmup_steps": 5.0})
    assert (cfg.train.max_steps, cfg.eval.eval_every, cfg.system.compile, cfg.model.bias, cfg.schedule.lr,
            cfg.schedule.warmup_steps) == (1000, 1000, True, False, 3e-4, 5)
    for key, value, message in [("lr", "inf", "lr must be a float, got 'inf': give a finite number, e.g. 0.001"),
                                ("batch-size", True, "batch-size must be an int, got True: give a whole number"),
                                ("name", 5, "name must be a str, got 5: give text"),
                                ("compile", 1, "compile must be a bool, got 1: give true or false")]:
        with pytest.raises(CairnError) as e:
            apply_overrides(RunConfig(), {key: value})
        assert str(e.value).startswith(message)


ROOT = Path(__file__).resolve().parents[1]


def test_every_recorded_runs_config_loads_and_means_what_its_file_says():
    """The config.toml of every recorded run (written in the flat [model] [data] [train] layout, before
    the sections by concern) loads, and every value the file states lands in the field of that name."""
    from cairn.config.io import read_toml

    files = sorted((ROOT / "benchmarks" / "runs").glob("*/config.toml"))
    assert files
    index = field_index()
    for f in files:
        cfg = load_toml(f)
        raw = read_toml(f)
        for section, table in raw.items():
            for key, value in (table.items() if isinstance(table, dict) else [(section, table)]):
                where, name, _ = index[key]
                owner = cfg if where is None else getattr(cfg, where)
                got = getattr(owner, name)  # a list setting (report.trackers) is held as a tuple
                assert (list(got) if isinstance(got, tuple) else got) == value, (f.name, section, key)


def _recorded_train_flags() -> set[str]:
    """Every --flag of every `cairn train` command the docs, the README and the records quote."""
    import json
    import re

    texts = [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    for record in sorted((ROOT / "benchmarks" / "records").glob("*.json")):
        texts.append(json.dumps(json.loads(record.read_text(encoding="utf-8"))))
    flags = set()
    for text in texts:
        for command in re.findall(r"cairn train((?:[^\n`|\"]|\\\n)*)", text.replace("\\\\\n", " ")):
            flags |= set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", command))
    return flags


def test_every_recorded_train_command_uses_options_that_still_exist():
    from cairn.cli.main import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    own = {s.lstrip("-") for a in train._actions for s in a.option_strings}
    flags = _recorded_train_flags()
    assert {"preset", "data", "out", "time-budget", "max-steps"} <= flags  # the scan finds the commands
    unknown = {f for f in flags if f not in own and f.replace("-", "_") not in field_index()}
    assert not unknown, unknown
