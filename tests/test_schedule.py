import pytest

from cairn.config import TrainConfig
from cairn.training.optim import lr_at, make_optimizer, warmup_steps
from cairn.model import Transformer
from cairn.config import ModelConfig
import torch


def test_linear_warmup_then_linear_decay_values():
    t = TrainConfig(lr=1.0, min_lr=0.0, schedule="linear", warmup_steps=4)
    lrs = [lr_at(s, t, 12) for s in range(12)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_decays_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=0)
    assert lr_at(0, t, 100) == pytest.approx(1.0)
    assert lr_at(50, t, 100) == pytest.approx(0.55)
    assert lr_at(100, t, 100) == pytest.approx(0.1)
    assert all(lr_at(s, t, 100) >= lr_at(s + 1, t, 100) for s in range(100))


def test_warmup_fraction_and_the_tutorials_whole_run_warmup():
    assert warmup_steps(TrainConfig(warmup_frac=0.1), 200) == 20
    whole = TrainConfig(lr=1.0, warmup_frac=1.0)
    assert warmup_steps(whole, 10) == 10
    assert [lr_at(s, whole, 10) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_mlp=32, context_len=8))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
