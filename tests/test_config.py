import pytest

from cairn.config import (RunConfig, apply_overrides, from_dict, load_toml, to_toml, validate)
from cairn.errors import CairnError
from cairn.presets import PRESETS, preset

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
            precision="auto", compile=False, num_threads=0, num_workers=0, test_at_end=True, tensorboard=False,
            skip_nonfinite=0, time_budget="", end_stories=3, end_story_tokens=200, parallel="ddp",
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
            test_at_end=True, tensorboard=False, skip_nonfinite=0, time_budget="", end_stories=3,
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
            test_at_end=True, tensorboard=False, skip_nonfinite=0, time_budget="10m", end_stories=3,
            end_story_tokens=300, parallel="ddp", dist_timeout_s=600),
    ),
    "tiny": dict(
        name="tiny", seed=42, tokenizer="gpt2",
        model=dict(vocab_size=50257, d_model=64, n_layers=2, n_heads=4, d_mlp=256, context_len=128, bias=True, dropout=0.0,
            norm_eps=1e-05, tie_embeddings=False, positions="sinusoidal", rope_theta=10000.0, norm="layernorm",
            mlp="gelu", zero_init=False),
        data=dict(source="roneneldan/TinyStories", hub_split="train", text_field="text", txt_separator="<|endoftext|>",
            n_samples=0, train_frac=0.8, val_frac=0.1, batching="pack", seq_len=64, story_mask=False,
            pack_shift=False, cache_dir=""),
        train=dict(batch_size=8, grad_accum=1, epochs=1, max_steps=0, optimizer="adamw", muon_momentum=0.95, lr=0.003,
            min_lr=0.0, embed_lr_scale=1.0, schedule="cosine", warmup_steps=-1, warmup_frac=0.1, weight_decay=0.1,
            embed_weight_decay=-1.0, beta1=0.9, beta2=0.95, eps=1e-08, grad_clip=1.0, report_every=5, eval_every=20,
            eval_batches=5, epoch_val="full", patience=5, checkpoint_every=20, keep_checkpoints=0, device="auto",
            precision="auto", compile=False, num_threads=0, num_workers=0, test_at_end=True, tensorboard=False,
            skip_nonfinite=0, time_budget="", end_stories=1, end_story_tokens=32, parallel="ddp",
            dist_timeout_s=600),
    ),
}


def test_reference_preset_has_the_tutorials_hyperparameters():
    c = preset("reference-105m")
    assert (c.model.vocab_size, c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_mlp,
            c.model.context_len) == (50257, 768, 4, 12, 3072, 1000)
    assert (c.data.n_samples, c.data.train_frac, c.data.val_frac, c.data.batching) == (100, 0.8, 0.1, "pad")
    t = c.train
    assert (t.batch_size, t.lr, t.grad_clip, t.patience, t.report_every, t.checkpoint_every, t.epochs) == \
        (32, 5e-4, 1.0, 5, 5, 50, 1)
    assert t.schedule == "linear" and t.warmup_frac < 1.0  # not the whole run
    assert c.seed == 42
    validate(c)


def test_overrides_short_dotted_and_dashed():
    c = apply_overrides(preset("cpu-small"), {"lr": "1e-3", "model.d_model": "128", "n-heads": "4",
                                              "compile": "true", "batching": "pad"})
    assert c.train.lr == 1e-3 and c.model.d_model == 128 and c.model.n_heads == 4 and c.train.compile is True
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
    ({"schedule": "step"}, "schedule"),
    ({"batching": "bucket"}, "batching"),
    ({"batching": "pad", "story_mask": True}, "story_mask is for packed rows"),
    ({"batching": "pad", "pack_shift": True}, "pack_shift is for packed rows"),
    ({"epoch_val": "some"}, "epoch_val must be 'full' or 'sample'"),
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
    with pytest.raises(CairnError, match="train.lr must be a float"):
        load_toml(f)
    f.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(CairnError, match="unknown key train.learning_rate"):
        load_toml(f)
    f.write_text("preset = 'cpu-small'\n[model]\nd_model = 512\n")
    assert load_toml(f).model.d_model == 512 and load_toml(f).name == "cpu-small"
    with pytest.raises(CairnError, match="unknown preset"):
        preset("gpt5")


def test_every_preset_is_valid_and_cpu_10min_is_the_measured_one():
    from cairn.model import Transformer

    for name in PRESETS:
        validate(preset(name))
    c = preset("cpu-10min")
    # the settings docs/ablation-cpu-10min.md measured; the run's time budget plans the steps
    assert c.tokenizer == "bpe:4096" and c.train.time_budget == "10m" and c.train.end_stories == 3 and c.train.compile
    assert (c.model.positions, c.model.norm, c.model.mlp, c.model.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert (c.model.d_model, c.model.n_layers, c.model.tie_embeddings) == (128, 3, False)
    assert (c.train.batch_size, c.train.lr, c.train.embed_lr_scale, c.train.beta2) == (4, 2.5e-3, 10.0, 0.999)
    assert c.data.val_frac > 0  # scored on a validation split it never trains on
    assert c.data.story_mask and c.train.epoch_val == "sample"
    c.model.vocab_size = 4096
    assert Transformer(c.model).num_params() == 1_651_584


def test_presets_keep_their_values():
    assert set(PRESETS) == set(PRESET_VALUES)
    for name, expected in PRESET_VALUES.items():
        assert preset(name).to_dict() == expected, name
