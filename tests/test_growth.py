"""grow_to_epochs: a budget that affords too many epochs trains a wider model instead."""

from __future__ import annotations

import logging

import pytest

from cairn.config.sections import ModelConfig

from cairn.config.io import load_toml
from cairn.checkpoint.load import load
from cairn.training import train
from cairn.training.budget.growth import choose, wider
from helpers import config


def test_wider_shapes_keep_the_head_size_and_the_mlp_ratio():
    base = ModelConfig(d_model=128, n_heads=2, d_mlp=352, n_layers=3)
    shapes = wider(base)
    assert shapes[0] is base and len(shapes) == 7  # 2 heads up to 8 (4x the width)
    assert [(s.d_model, s.n_heads, s.d_mlp) for s in shapes[1:4]] == [(192, 3, 512), (256, 4, 704), (320, 5, 896)]
    assert all(s.n_layers == 3 and s.d_model // s.n_heads == 64 for s in shapes)


def test_the_narrowest_shape_within_the_epochs_is_chosen_else_the_widest():
    epochs = [11.0, 6.5, 3.8, 2.9]
    assert choose(epochs, 4.0) == 2
    assert choose(epochs, 12.0) == 0  # the configured one when it fits
    assert choose(epochs, 1.0) == 3  # none fits: the widest


@pytest.mark.slow
def test_a_budget_with_room_for_too_many_epochs_trains_a_wider_model(tmp_path, stories_file, small_tokenizer, caplog):
    """A 12-second budget over a small split would take dozens of epochs of the tiny model: with
    grow_to_epochs 2 the run measures a wider shape, trains it, and its config records it, so the
    run loads as any other."""
    cfg = config(stories_file, tokenizer=small_tokenizer, time_budget="12s", grow_to_epochs=2, end_stories=0,
                 eval_every=0, checkpoint_every=0, report_every=1000)
    with caplog.at_level(logging.INFO, logger="cairn"):
        train(cfg, tmp_path / "run")
    assert "measuring a wider one, d_model" in caplog.text and "the wider model gets" in caplog.text, caplog.text
    saved = load_toml(tmp_path / "run" / "config.toml")
    assert saved.model.d_model > cfg.model.d_model and saved.model.d_model // saved.model.n_heads == 8
    loaded = load(tmp_path / "run")
    assert loaded.model.cfg.d_model == saved.model.d_model


def test_growth_is_off_without_a_budget_or_when_zero(tmp_path, stories_file, small_tokenizer, caplog):
    cfg = config(stories_file, tokenizer=small_tokenizer, grow_to_epochs=2, max_steps=2, end_stories=0)
    with caplog.at_level(logging.INFO, logger="cairn"):
        train(cfg, tmp_path / "run")
    assert "wider" not in caplog.text
    assert load_toml(tmp_path / "run" / "config.toml").model.d_model == cfg.model.d_model


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_grow_to_epochs_is_refused(value, tmp_path, stories_file, capsys):
    from cairn.cli import main

    assert main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(tmp_path / "r"),
                 "--grow-to-epochs", value]) == 2
    assert "grow" in capsys.readouterr().err


@pytest.mark.parametrize("grow_to, trained", [(2, "wider"), (10_000, "configured")])
def test_a_compiling_run_measures_the_configured_model_eagerly_first(grow_to, trained, monkeypatch, tmp_path,
                                                                     stories_file, small_tokenizer):
    """Under a budget that may grow the model, the configured one is first measured without
    torch.compile: when its eager plan already has too many epochs, only the wider model that
    trains is compiled; when the eager plan fits, the configured model is measured again compiled
    (its faster steps may not fit) and trains so."""
    from cairn.training import build
    from cairn.training.distributed import Dist

    asked: list[tuple[int, bool]] = []
    real = build.assemble

    def spy(model, inputs, *, compiled, **kw):
        asked.append((model.cfg.d_model, compiled))
        return real(model, inputs, compiled=False, **kw)  # the choice is under test, not the compiler

    monkeypatch.setattr(build, "assemble", spy)
    monkeypatch.setattr(build, "_can_compile", lambda asked_for, device: asked_for)
    cfg = config(stories_file, tokenizer=small_tokenizer, time_budget="12s", grow_to_epochs=grow_to,
                 end_stories=0, compile=True)
    trainer = build.build_trainer(cfg, tmp_path / "run", Dist())
    d = cfg.model.d_model
    if trained == "wider":
        assert asked[0] == (d, False) and len(asked) == 2 and asked[1][0] > d and asked[1][1] is True, asked
        assert trainer.model.cfg.d_model > d
    else:
        assert asked == [(d, False), (d, True)]
        assert trainer.model.cfg.d_model == d


def test_without_growth_the_configured_model_is_measured_compiled_once(monkeypatch, tmp_path, stories_file,
                                                                       small_tokenizer):
    from cairn.training import build
    from cairn.training.distributed import Dist

    asked: list[bool] = []
    real = build.assemble

    def spy(model, inputs, *, compiled, **kw):
        asked.append(compiled)
        return real(model, inputs, compiled=False, **kw)

    monkeypatch.setattr(build, "assemble", spy)
    monkeypatch.setattr(build, "_can_compile", lambda asked_for, device: asked_for)
    cfg = config(stories_file, tokenizer=small_tokenizer, time_budget="12s", end_stories=0, compile=True)
    build.build_trainer(cfg, tmp_path / "run", Dist())
    assert asked == [True]
