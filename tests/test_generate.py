import torch

from cairn.config import ModelConfig
from cairn.generate import SamplingConfig, filter_logits, generate_ids
from cairn.model import Transformer


def model(context_len=32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_mlp=64,
                                   context_len=context_len)).eval()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = model()
    s = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7, stop_at_eot=False)
    a = list(generate_ids(m, [1, 2, 3], s))
    b = list(generate_ids(m, [1, 2, 3], s))
    c = list(generate_ids(m, [1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8, stop_at_eot=False)))
    assert a == b and a != c


def test_cached_and_uncached_generation_agree_past_the_context():
    m = model(context_len=16)
    s = SamplingConfig(max_new_tokens=30, temperature=0, stop_at_eot=False)
    prompt = list(range(1, 11))
    assert list(generate_ids(m, prompt, s, use_cache=True)) == list(generate_ids(m, prompt, s, use_cache=False))


def test_greedy_picks_the_argmax():
    m = model()
    out = list(generate_ids(m, [5, 6], SamplingConfig(max_new_tokens=1, temperature=0, stop_at_eot=False)))
    with torch.no_grad():
        assert out[0] == int(m(torch.tensor([[5, 6]]))[0, -1].argmax())


def test_prompt_longer_than_context_keeps_its_end():
    m = model(context_len=16)
    s = SamplingConfig(max_new_tokens=3, temperature=0, stop_at_eot=False)
    long_prompt = list(range(40))
    assert list(generate_ids(m, long_prompt, s)) == list(generate_ids(m, long_prompt[-16:], s))


def test_stops_at_end_of_text():
    m = model()
    greedy = SamplingConfig(max_new_tokens=5, temperature=0, stop_at_eot=False)
    first = list(generate_ids(m, [3, 4], greedy))[0]
    # declare the token it would emit first to be the end of text: nothing is produced
    assert list(generate_ids(m, [3, 4], SamplingConfig(max_new_tokens=5, temperature=0), eot_id=first)) == []


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.4)  # the most likely token alone
    assert torch.isfinite(p).tolist() == [[True, False, False, False]]
    m = model()
    s = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=3, stop_at_eot=False)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, stop_at_eot=False)
    assert list(generate_ids(m, [1], s)) == list(generate_ids(m, [1], greedy))
