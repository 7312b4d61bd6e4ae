import pytest

from cairn.config import (RunConfig, apply_overrides, from_dict, load_toml, preset, to_toml, validate)
from cairn.errors import CairnError


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
    from cairn.config import PRESETS, validate
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
