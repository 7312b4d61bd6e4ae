import pytest

from cairn.config.sections import OptimConfig, ScheduleConfig
from cairn.training.optim import lr_at, make_optimizer, warmup_steps
from cairn.model.transformer import Transformer
from cairn.config.sections import ModelConfig
import torch


def test_linear_warmup_then_linear_decay_values():
    t = ScheduleConfig(lr=1.0, min_lr=0.0, schedule="linear", warmup_steps=4)
    lrs = [lr_at(s, t, 12) for s in range(12)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_decays_to_min_lr():
    t = ScheduleConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=0)
    assert lr_at(0, t, 100) == pytest.approx(1.0)
    assert lr_at(50, t, 100) == pytest.approx(0.55)
    assert lr_at(100, t, 100) == pytest.approx(0.1)
    assert all(lr_at(s, t, 100) >= lr_at(s + 1, t, 100) for s in range(100))


def test_warmup_fraction_and_the_tutorials_whole_run_warmup():
    assert warmup_steps(ScheduleConfig(warmup_frac=0.1), 200) == 20
    whole = ScheduleConfig(lr=1.0, warmup_frac=1.0)
    assert warmup_steps(whole, 10) == 10
    assert [lr_at(s, whole, 10) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_mlp=32, context_len=8))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), 1e-3, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_replan_never_raises_the_learning_rate_and_still_ends_at_min_lr(schedule):
    """A time budget's re-plans move the end of the run (longer, shorter, longer again): the rate
    in force at each re-plan stays, it never rises after the warm-up, and it reaches min_lr at the
    final end. Stretching the old schedule instead raised it at each longer plan (the test below)."""
    from cairn.checkpoint.schema import Plan
    from cairn.training.budget.budget import Budget
    from cairn.training.distributed import Dist

    t = ScheduleConfig(lr=1e-3, min_lr=1e-4, schedule=schedule, warmup_steps=50)
    plan = Budget(Plan(micro_batches_per_epoch=100, steps_per_epoch=100, total_steps=1000, warmup_steps=50, epochs=10),
                  600.0, 0.0, Dist(device=torch.device("cpu")), t, 0)
    moves = {30: 1200, 300: 1400, 700: 1100, 900: 1300}  # the first, during the warm-up
    lrs = []
    for step in range(1400):
        if step in moves:
            before = plan.lr(step)
            plan.move_end(step, moves[step])
            assert plan.lr(step) == pytest.approx(before)  # the rate in force does not jump
        if step >= plan.plan.total_steps:
            break
        lrs.append(plan.lr(step))
    assert plan.plan.warmup_steps == 50 and len(lrs) == 1300
    assert lrs[:50] == pytest.approx([1e-3 * (s + 1) / 50 for s in range(50)])
    assert all(a >= b - 1e-15 for a, b in zip(lrs[49:], lrs[50:]))  # never up after the warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=0.02) and plan.lr(1300) == pytest.approx(1e-4)
    # the plan survives a checkpoint (it is saved as a dict and rebuilt on resume)
    again = Budget(Plan(), 600.0, 0.0, Dist(device=torch.device("cpu")), t, 0)
    again.load_state_dict(plan.state_dict())
    assert [again.lr(s) for s in range(900, 1300)] == [plan.lr(s) for s in range(900, 1300)]


def test_the_old_schedule_would_have_raised_the_rate_at_a_longer_plan():
    """The reason for re-laying: the same step under a longer plan of the plain schedule is higher."""
    t = ScheduleConfig(lr=1e-3, min_lr=0.0, schedule="linear", warmup_steps=50)
    assert lr_at(700, t, 1400, 50) > lr_at(700, t, 1000, 50) * 1.05
