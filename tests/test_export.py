"""`cairn export --format hf`: transformers loads the export offline and computes what cairn computes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from cairn.version import __version__  # noqa: E402
from cairn.cli import main  # noqa: E402
from cairn.config.presets import preset  # noqa: E402
from cairn.util.errors import CairnError  # noqa: E402
from cairn.export.hf import export_hf  # noqa: E402
from cairn.inference.generate import SamplingConfig, generate_ids  # noqa: E402
from cairn.checkpoint.load import load  # noqa: E402
from cairn.model.transformer import Transformer  # noqa: E402
from cairn.tokenizer.base import gpt2  # noqa: E402
from cairn.checkpoint import store as ckpt  # noqa: E402

# a TinyStories story (real text, with the dataset's curly quote)
STORY = ("One day, a little girl named Lily found a needle in her room. She knew it was difficult to play with it "
         "because it was sharp. Lily wanted to share the needle with her mom, so she could sew a button on her "
         "shirt. She went to her mom and said, \u201cMom, I found this needle. Can you share it with me?\u201d")


def save_run(run: Path, cfg, model: Transformer) -> Path:
    """A run directory with one final checkpoint, as the training loop writes it."""
    tok = gpt2()
    meta = {"kind": "final", "cairn_version": __version__, "config": cfg.to_dict(),
            "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size}}
    return ckpt.save_checkpoint(run / "checkpoints" / f"{cfg.name}_final", model.weights(), meta)


def assert_same_greedy_tokens(model, hf, prompt: list[int], n: int = 30) -> None:
    s = SamplingConfig(max_new_tokens=n, temperature=0.0)
    ours = list(generate_ids(model, list(prompt), s, 50256, True))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    if theirs and theirs[-1] == 50256:  # transformers keeps the end-of-text it stopped at; cairn does not
        theirs = theirs[:-1]
    assert ours == theirs and len(ours) > 0


def tiny_model(bias: bool = True, seed: int = 0, tied: bool = False):
    cfg = preset("tiny")
    cfg.model.bias = bias
    cfg.model.tie_embeddings = tied
    cfg.model.context_len = 96
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    # far from the initialisation (nonzero biases, LayerNorm gains, large weights) so every mapping,
    # transpose and bias is exercised and the logits are spread out
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "ln" in name and
                                                                             name.endswith("weight") else 0.0))
    return cfg, model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg, model = tiny_model()
    save_run(root / "run", cfg, model)
    out = root / "hf"
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(out)]) == 0
    return root / "run", out


def test_export_writes_a_gpt2_directory(exported):
    run, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((out / "config.json").read_text())
    m = preset("tiny").model
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu"
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_inner"], config["n_positions"],
            config["vocab_size"]) == (m.d_model, m.n_layers, m.n_heads, m.d_mlp, 96, 50257)
    assert config["tie_word_embeddings"] is False and config["bos_token_id"] == config["eos_token_id"] == 50256


@pytest.mark.slow
def test_transformers_loads_it_offline_with_the_same_logits_and_tokens(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = exported
    loaded = load(run, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.dtype == torch.float32
    # the fixed position table became wpe exactly; the head is not tied to the embedding
    assert torch.equal(hf.transformer.wpe.weight, loaded.model.pos_table)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    ids = [50256] + gpt2().encode(STORY)
    assert tok(tok.eos_token + STORY)["input_ids"] == ids
    assert tok.decode(ids[1:]) == STORY

    x = torch.tensor([ids])
    with torch.no_grad():
        ours = loaded.model(x)
        theirs = hf(x).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4

    assert_same_greedy_tokens(loaded.model, hf, ids[:12])


def test_a_model_without_biases_is_refused(tmp_path, capsys):
    cfg, model = tiny_model(bias=False)
    save_run(tmp_path / "run", cfg, model)
    with pytest.raises(CairnError, match="bias"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bias" in err and len(err.splitlines()) == 1


def test_export_refuses_a_non_empty_out(exported, tmp_path):
    run, _ = exported
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    with pytest.raises(CairnError, match="not an empty directory"):
        export_hf(run, tmp_path / "taken")


def test_a_tied_model_exports_as_gpt2_with_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, model = tiny_model(tied=True, seed=1)
    save_run(tmp_path / "run", cfg, model)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    x = torch.tensor([[50256] + gpt2().encode(STORY)])
    with torch.no_grad():
        assert (load(tmp_path / "run", device="cpu").model(x) - hf(x).logits).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- the Llama block exports as Llama

def llama_model(bias: bool, tied: bool, seed: int = 2):
    cfg = preset("tiny")
    m = cfg.model
    m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "rope", "rmsnorm", "swiglu", bias, tied
    m.context_len, m.rope_theta, m.d_mlp = 96, 500.0, 96  # an unusual theta: a wrong one would show
    torch.manual_seed(seed)
    model = Transformer(m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "ln" in name else 0.0))
    return cfg, model.eval()


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_the_llama_block_exports_as_llama_with_the_same_logits_and_generation(tmp_path, bias, tied):
    from transformers import AutoModelForCausalLM

    cfg, model = llama_model(bias, tied)
    save_run(tmp_path / "run", cfg, model)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is tied
    assert config["attention_bias"] is bias and config["mlp_bias"] is bias
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied
    ids = [50256] + gpt2().encode(STORY)
    x = torch.tensor([ids])
    loaded = load(tmp_path / "run", device="cpu")
    with torch.no_grad():
        ours_logits = loaded.model(x)
        diff = (ours_logits - hf(x).logits).abs().max().item()
    # float32 round-off relative to the logits' size; transformers computes the rotary angles in
    # float32, cairn in float64 (a wrong theta or mapping differs by whole units, not 1e-5)
    assert diff <= 2e-5 * ours_logits.abs().max().item(), diff

    assert_same_greedy_tokens(loaded.model, hf, ids[:12])


def test_a_block_mixing_gpt2_and_llama_is_refused_naming_the_fields(tmp_path, capsys):
    cfg, model = tiny_model()
    cfg.model.positions = "rope"  # rotary positions with LayerNorm + GELU: neither format computes it
    torch.manual_seed(0)
    save_run(tmp_path / "run", cfg, Transformer(cfg.model))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert "positions=rope" in err and "norm=layernorm" in err and "mlp=gelu" in err
    assert not (tmp_path / "hf").exists()
