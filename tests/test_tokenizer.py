from cairn.tokenizer.base import gpt2


def test_gpt2_known_ids():
    tok = gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert tok.enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_special_token_text_is_ordinary_text():
    # a story that happens to contain the string must not inject an end-of-text
    assert 50256 not in gpt2().encode("a <|endoftext|> b")


def test_round_trip_and_bytes_table():
    tok = gpt2()
    text = "Lily’s cat said: “héllo” 123!\n\nThe end."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes[tok.eot_id] == 0
