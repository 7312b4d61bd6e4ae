"""TensorBoard logging: metrics records become scalars at their step, read back from the event files."""

import sys

import pytest

from cairn.util.errors import CairnError
from cairn.trackers.tensorboard import INSTALL_HINT, TensorBoardLogger, require_tensorboard, scalars

RECORDS = [
    {"kind": "train", "step": 10, "epoch": 1, "train_loss": 9.5, "train_perplexity": 13360.7, "lr": 3e-3,
     "grad_norm": 1.25, "tokens_per_s": 700.0, "tokens": 20480, "time": 1_700_000_000.5},
    {"kind": "val", "step": 10, "epoch": 1, "val_loss": 9.0, "val_perplexity": 8103.1, "val_bits_per_byte": 3.5,
     "val_tokens": 4096, "full": False},
    {"kind": "train", "step": 20, "epoch": 1, "train_loss": 7.25, "train_perplexity": 1408.1, "lr": 2e-3,
     "grad_norm": 0.75, "tokens_per_s": 800.0, "tokens": 40960, "time": 1_700_000_060.5, "mfu": 0.125},
    {"kind": "val", "step": 20, "epoch": 1, "val_loss": None, "val_perplexity": None, "val_bits_per_byte": 2.5,
     "val_tokens": 4096, "full": True},
    {"kind": "test", "step": 20, "epoch": 1, "test_loss": 6.5, "test_perplexity": 665.1, "test_bits_per_byte": 2.0,
     "test_tokens": 5000},
    {"kind": "something-else", "step": 20, "loss": 1.0},
]


def _accumulator(run):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return acc


def _series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_records_become_scalars_at_their_steps(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardLogger(tmp_path) as tb:
        for r in RECORDS:
            tb.write(r)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    acc = _accumulator(tmp_path)
    assert set(acc.Tags()["scalars"]) == {
        "train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
        "val/loss", "val/perplexity", "val/bits_per_byte", "test/loss", "test/perplexity", "test/bits_per_byte"}
    assert _series(acc, "train/loss") == [(10, 9.5), (20, 7.25)]
    assert _series(acc, "train/lr") == [(10, pytest.approx(3e-3)), (20, pytest.approx(2e-3))]
    assert _series(acc, "train/grad_norm") == [(10, 1.25), (20, 0.75)]
    assert _series(acc, "train/tokens_per_s") == [(10, 700.0), (20, 800.0)]
    assert _series(acc, "train/mfu") == [(20, 0.125)]
    assert _series(acc, "val/loss") == [(10, 9.0)]  # the null loss at step 20 is skipped
    assert _series(acc, "val/bits_per_byte") == [(10, 3.5), (20, 2.5)]
    assert _series(acc, "test/loss") == [(20, 6.5)]
    assert _series(acc, "test/bits_per_byte") == [(20, 2.0)]
    # train records carry their wall time
    assert [e.wall_time for e in acc.Scalars("train/loss")] == pytest.approx([1_700_000_000.5, 1_700_000_060.5])


def test_a_resumed_run_purges_the_steps_it_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardLogger(tmp_path) as tb:
        for step, loss in ((10, 5.0), (20, 4.0), (30, 3.0)):
            tb.write({"kind": "train", "step": step, "train_loss": loss})
    with TensorBoardLogger(tmp_path, purge_step=11) as tb:  # resumed from a checkpoint at step 10
        for step, loss in ((20, 4.5), (30, 3.5)):
            tb.write({"kind": "train", "step": step, "train_loss": loss})
    assert _series(_accumulator(tmp_path), "train/loss") == [(10, 5.0), (20, 4.5), (30, 3.5)]


def test_scalars_maps_only_known_numeric_fields():
    assert scalars({"kind": "val", "step": 3, "val_loss": 2.0, "val_tokens": 10, "full": True}) == {"val/loss": 2.0}
    assert scalars({"kind": "train", "step": 1, "lr": 1e-3, "grad_norm": float("nan")})["train/lr"] == 1e-3
    assert scalars({"kind": "other", "step": 1, "val_loss": 1.0}) == {}


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(CairnError, match="cairn-lm"):
        require_tensorboard()
    with pytest.raises(CairnError) as e:
        TensorBoardLogger(tmp_path)
    assert str(e.value) == INSTALL_HINT
    assert str(e.value) == ("TensorBoard logging needs the tensorboard package: "
                            "pip install 'cairn-lm[tensorboard]'")
    assert not (tmp_path / "tensorboard").exists()


def test_training_with_tensorboard_writes_the_run_scalars(tmp_path, stories_file, small_tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cairn.config.io import apply_overrides
    from cairn.config.presets import preset
    from cairn.training import train

    cfg = apply_overrides(preset("tiny"), {"source": str(stories_file), "tokenizer": str(small_tokenizer),
                                           "d_model": 32, "n_heads": 4, "d_mlp": 64, "seq_len": 32, "batch_size": 4,
                                           "max_steps": 6, "report_every": 2, "eval_every": 3, "eval_batches": 1,
                                           "tensorboard": True})
    train(cfg, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
