"""The optimizers: which parameters Muon takes, and that its state survives a save and load."""

import copy

import pytest
import torch

from cairn.config.sections import ModelConfig, OptimConfig
from cairn.model.transformer import Transformer
from cairn.training.optim import MuonWithAdamW, make_optimizer


def model(tied: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_mlp=64, context_len=32,
                                   tie_embeddings=tied, mlp="swiglu", norm="rmsnorm", positions="rope"))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = model()
    opt = make_optimizer(m, OptimConfig(optimizer="muon", weight_decay=0.1), 1e-3, torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "wte.weight" in adamw and not muon & adamw
    assert muon | adamw == set(names.values())  # every parameter is trained, once
    decayed = {names[id(p)] for g in opt.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"wte.weight"}  # the norms' gains are not decayed


def test_muon_lowers_the_loss_and_its_state_round_trips():
    m = model()
    opt = make_optimizer(m, OptimConfig(optimizer="muon"), 3e-3, torch.device("cpu"))
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))

    def step(mod, o):
        s, n = mod(x, labels=y)
        (s / n).backward()
        o.step()
        o.zero_grad(set_to_none=True)
        return (s / n).item()

    first = step(m, opt)
    for _ in range(30):
        last = step(m, opt)
    assert last < first - 1.0
    # a copy restored from the state dict takes the very same next step
    twin = copy.deepcopy(m)
    twin_opt = make_optimizer(twin, OptimConfig(optimizer="muon"), 3e-3, torch.device("cpu"))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(m, opt)
    step(twin, twin_opt)
    for (n, a), (_, b) in zip(m.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n


def test_float32_muon_takes_torchs_muon_steps():
    """cairn's CPU Muon is torch's algorithm with float32 Newton-Schulz: compare with torch's own
    (bfloat16 Newton-Schulz, so agreement is to bf16 precision, ~1%, not bitwise)."""
    from cairn.training.optim import Float32Muon

    torch.manual_seed(0)
    shapes = [(16, 24), (24, 16), (20, 20)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Float32Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q, s in zip(ours, theirs, start):
        moved, gap = (p - s).norm().item(), (p - q).norm().item()
        assert moved > 0.1 and gap < 0.02 * moved, (moved, gap)


def test_embedding_learning_rate_scale_is_its_own_group_in_both_optimizers():
    for name in ("adamw", "muon"):
        m = model(tied=False)
        opt = make_optimizer(m, OptimConfig(optimizer=name, embed_lr_scale=8.0), 1e-3, torch.device("cpu"))
        names = {id(p): n for n, p in m.named_parameters()}
        scaled = [g for g in opt.param_groups if g.get("lr_scale", 1.0) != 1.0]
        assert [[names[id(p)] for p in g["params"]] for g in scaled] == [["wte.weight"]]
        assert scaled[0]["lr_scale"] == 8.0
        assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    # at scale 1 the groups are the usual two, so checkpoints from before the option still load
    assert len(make_optimizer(model(), OptimConfig(), 5e-4, torch.device("cpu")).param_groups) == 2


@pytest.mark.slow
def test_the_training_loop_applies_the_embedding_scale(tmp_path, stories_file, small_tokenizer):
    from cairn.config.io import apply_overrides
    from cairn.config.presets import preset
    from cairn.training import train
    from safetensors.torch import load_file

    finals = {}
    for scale in (1.0, 8.0):
        cfg = apply_overrides(preset("tiny"), {
            "source": str(stories_file), "tokenizer": str(small_tokenizer), "d_model": 32, "n_heads": 4,
            "n_layers": 1, "d_mlp": 64, "context_len": 32, "seq_len": 32, "batch_size": 4, "max_steps": 1,
            "warmup_steps": 0, "weight_decay": 0.0, "embed_lr_scale": scale, "end_stories": 0})
        train(cfg, tmp_path / str(scale))
        final = next((tmp_path / str(scale) / "checkpoints").glob("*_final"))
        finals[scale] = load_file(str(final / "model.safetensors"))
    a, b = finals[1.0], finals[8.0]
    # one step from the same weights and batch: everything but the embedding moved the same way
    assert all(torch.equal(a[k], b[k]) for k in a if k != "wte.weight")
    assert not torch.equal(a["wte.weight"], b["wte.weight"])


def test_embedding_weight_decay_is_its_own_and_spares_rows_not_seen():
    """Decoupled decay shrinks every embedding row by lr * decay each step, its token seen or not;
    at 10x the lr that is 10x the shrinkage, so the embedding can keep a decay of its own."""
    rows = {}
    for embed_wd in (-1.0, 0.0):
        m = model(tied=False)
        t = OptimConfig(weight_decay=0.5, embed_lr_scale=10.0, embed_weight_decay=embed_wd)
        opt = make_optimizer(m, t, 1e-2, torch.device("cpu"))
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g.get("lr_scale", 1.0)
        before = m.wte.weight.detach().clone()
        x = torch.tensor([[1, 2, 3, 4]])
        loss, _ = m(x, labels=x)
        loss.backward()
        opt.step()
        rows[embed_wd] = (before, m.wte.weight.detach().clone())
        embed_group = [g for g in opt.param_groups if any(p is m.wte.weight for p in g["params"])][0]
        assert embed_group["weight_decay"] == (0.5 if embed_wd < 0 else 0.0)
        assert [g["weight_decay"] for g in opt.param_groups if g is not embed_group] == [0.5, 0.0]
    unseen = 50  # a token not in the batch: no gradient, so only decay can move its row
    before, after = rows[-1.0]
    assert torch.allclose(after[unseen], before[unseen] * (1 - 1e-2 * 10 * 0.5))
    before, after = rows[0.0]
    assert torch.equal(after[unseen], before[unseen])
    assert not torch.equal(after[1], before[1])  # a seen token's row still learns
