"""`cairn serve` against real clients: OpenAI's SDK and httpx talk to a uvicorn server on a free
loopback port, serving the shared trained run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from cairn.cli import main  # noqa: E402
from cairn.checkpoint.load import load  # noqa: E402
from cairn.serve import bind  # noqa: E402
from cairn.serve.app import ServeSettings, create_app  # noqa: E402
from helpers import serving as running  # noqa: E402

MAX_CONCURRENCY = 4
MAX_BODY = 16_384


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load(trained_run.run, "cpu")


def make_app(loaded, **kw):
    settings = ServeSettings(**{"model_name": "tiny-run", "max_concurrency": MAX_CONCURRENCY, "max_body": MAX_BODY,
                                "max_tokens": 512, **kw})
    return create_app(loaded.model, loaded.tokenizer, settings)


@pytest.fixture(scope="module")
def server(loaded):
    app = make_app(loaded)
    with running(app) as url:
        yield url, app.state.engine


def client(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def cairn_generate(run, prompt: str, **flags) -> dict:
    args = ["generate", str(run), "--prompt", prompt, "--json", "--device", "cpu"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return json.loads(out.getvalue())


def test_openai_client_streams_the_text_it_completes_and_cairn_generate_writes(server, trained_run, loaded):
    url, _ = server
    c = client(url)
    settings = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)
    prompt = "Once upon a time"
    whole = c.completions.create(model="tiny-run", prompt=prompt, extra_body={"top_k": 50}, **settings)
    pieces, finish, used = [], None, None
    for chunk in c.completions.create(model="tiny-run", prompt=prompt, stream=True, extra_body={"top_k": 50},
                                      **settings):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        used = chunk.usage or used
    ref = cairn_generate(trained_run.run, prompt, max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=7)

    assert len([p for p in pieces if p]) > 3  # it came in pieces
    assert whole.choices[0].text == "".join(pieces) == ref["text"]
    assert whole.choices[0].finish_reason == finish == ("length" if ref["finish_reason"] == "length" else "stop")
    assert whole.usage.completion_tokens == used.completion_tokens == ref["tokens"]
    assert whole.usage.prompt_tokens == used.prompt_tokens == len(loaded.tokenizer.encode(prompt)) + 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    # with include_usage, as OpenAI sends it: the usage alone in a last chunk without choices
    chunks = list(c.completions.create(model="tiny-run", prompt=prompt, stream=True, extra_body={"top_k": 50},
                                       stream_options={"include_usage": True}, **settings))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["tokens"]
    assert all(ch.usage is None for ch in chunks[:-1])
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == ref["text"]


def test_models_route_describes_the_run(server, loaded):
    url, _ = server
    models = client(url).models.list().data
    assert [m.id for m in models] == ["tiny-run"]
    card = models[0].model_dump()
    assert card["context_length"] == loaded.model.cfg.context_len
    assert card["parameters"] == loaded.model.num_params()
    assert card["tokenizer"] == loaded.tokenizer.name
    assert client(url).models.retrieve("tiny-run").id == "tiny-run"


def test_concurrent_requests_are_batched_and_each_gets_the_text_it_gets_alone(server):
    """Four streams at once (decoded together: the engine's mean batch is over 1), a request of
    2 prompts x n=2, and a stop string: every choice's text is the one it gets alone."""
    url, engine = server
    c = client(url)
    prompts = ["Once upon a time", "Tom had a red ball"]
    alone = {(p, seed): c.completions.create(model="tiny-run", prompt=p, max_tokens=30, temperature=1.0,
                                             seed=seed, extra_body={"ignore_eos": True}).choices[0].text
             for p in prompts for seed in (11, 12)}

    steps, rows = engine.steps, engine.rows_decoded
    got: dict = {}

    def stream(p, seed):
        got[(p, seed)] = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny-run", prompt=p, max_tokens=30, temperature=1.0, seed=seed, stream=True,
            extra_body={"ignore_eos": True}) if ch.choices)

    threads = [threading.Thread(target=stream, args=key) for key in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == alone
    assert (engine.rows_decoded - rows) / (engine.steps - steps) > 1.2  # several rows per forward pass

    both = c.completions.create(model="tiny-run", prompt=prompts, n=2, max_tokens=30, temperature=1.0, seed=11,
                                extra_body={"ignore_eos": True})
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in both.choices] == [alone[(p, s)] for p in prompts for s in (11, 12)]
    streamed = ["", "", "", ""]
    for chunk in c.completions.create(model="tiny-run", prompt=prompts, n=2, max_tokens=30, temperature=1.0,
                                      seed=11, stream=True, extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == [ch.text for ch in both.choices]

    text = alone[(prompts[0], 11)]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = c.completions.create(model="tiny-run", prompt=prompts[0], max_tokens=30, temperature=1.0, seed=11,
                                   stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.text == text[:text.index(stop)] and stopped.finish_reason == "stop"


BIG = "x" * (MAX_BODY + 10)
BAD_REQUESTS = [  # (what, raw body or JSON, status, param named, words the message must hold)
    ("malformed JSON", b'{"prompt": "Once", ', 400, None, "not valid JSON"),
    ("not an object", [1, 2], 400, None, "JSON object"),
    ("no prompt", {"max_tokens": 5}, 400, "prompt", "required"),
    ("prompt of the wrong type", {"prompt": 42}, 400, "prompt", "string"),
    ("prompt list of numbers", {"prompt": [1, 2]}, 400, "prompt", "list of strings"),
    ("max_tokens a string", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("max_tokens a float", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("max_tokens negative", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "from 1 to 512"),
    ("max_tokens zero", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "from 1 to 512"),
    ("max_tokens huge", {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens", "from 1 to 512"),
    ("temperature negative", {"prompt": "a", "temperature": -0.5}, 400, "temperature", "0 (greedy) or more"),
    ("temperature a string", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature true", {"prompt": "a", "temperature": True}, 400, "temperature", "number"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top_p above 1", {"prompt": "a", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("top_k negative", {"prompt": "a", "top_k": -3}, 400, "top_k", "from 0"),
    ("n zero", {"prompt": "a", "n": 0}, 400, "n", "from 1 to 16"),
    ("n above the limit", {"prompt": "a", "n": 17}, 400, "n", "from 1 to 16"),
    ("n above the concurrency", {"prompt": "a", "n": 5}, 400, "n", "--max-concurrency"),
    ("stop a number", {"prompt": "a", "stop": 3}, 400, "stop", "string or a list"),
    ("too many stops", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("seed negative", {"prompt": "a", "seed": -1}, 400, "seed", "integer from 0"),
    ("stream a string", {"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    ("unknown field", {"prompt": "a", "temprature": 1}, 400, "temprature", "unknown field"),
    # found by the long property run: a field name holding a newline made a two-line message
    ("unknown field holding a newline", {"prompt": "a", "x\ny": 1}, 400, "x\ny", "unknown field 'x\\ny'"),
    ("unsupported field", {"prompt": "a", "logprobs": 3}, 400, "logprobs", "not supported"),
    ("unknown model", {"prompt": "a", "model": "gpt-5"}, 404, "model", "tiny-run"),
    ("body too large", {"prompt": BIG}, 413, None, "--max-body"),
]


@pytest.mark.parametrize("what,body,status,param,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_clean_error_naming_the_field(server, what, body, status, param, words):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"], error["message"]


def test_wrong_routes_and_methods_answer_in_openai_shape_and_the_server_keeps_serving(server):
    url, _ = server
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(f"{url}/v1/models/gpt-5").status_code == 404
    # after every bad request of this module: still answering
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0


def test_a_prompt_longer_than_the_context_keeps_its_end(server, loaded, trained_run):
    url, _ = server
    ctx = loaded.model.cfg.context_len
    prompt = "Lily and Tom played in the park. " * 40
    assert len(loaded.tokenizer.encode(prompt)) > ctx
    r = client(url).completions.create(model="tiny-run", prompt=prompt, max_tokens=12, temperature=0.5, seed=3)
    assert r.usage.prompt_tokens == ctx
    assert r.choices[0].text == cairn_generate(trained_run.run, prompt, max_new_tokens=12, temperature=0.5,
                                               seed=3)["text"]


LONG = 10**6  # tokens: the tiny model takes minutes to write them


def _open_stream(url: str, http: "httpx.Client"):
    """A long streaming request held open after its first chunk."""
    body = {"prompt": "Once", "max_tokens": LONG, "stream": True, "ignore_eos": True, "seed": 1}
    cm = http.stream("POST", f"{url}/v1/completions", json=body, timeout=60)
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
    return cm, lines  # (dropping the line iterator would close the response)


def _wait_idle(url: str, seconds: float = 5.0) -> float:
    start = time.monotonic()
    while httpx.get(f"{url}/health").json()["in_flight"]:
        assert time.monotonic() - start < seconds, "slots were not freed"
        time.sleep(0.02)
    return time.monotonic() - start


def test_requests_over_the_concurrency_get_429_and_a_closed_stream_frees_its_slot_at_once(loaded):
    app = make_app(loaded, max_tokens=LONG)
    engine = app.state.engine
    with running(app) as url, httpx.Client() as http:
        streams = [_open_stream(url, http) for _ in range(MAX_CONCURRENCY)]
        assert httpx.get(f"{url}/health").json()["in_flight"] == MAX_CONCURRENCY
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="tiny-run", prompt="a", max_tokens=2)

        streams.pop()[0].__exit__(None, None, None)  # one client goes away mid-stream
        _wait_idle_to(url, MAX_CONCURRENCY - 1)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          timeout=60).status_code == 200
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        _wait_idle(url)
        # the abandoned sequences stopped: nothing is decoded any more
        rows = engine.rows_decoded
        time.sleep(0.3)
        assert engine.rows_decoded == rows


def _wait_idle_to(url: str, n: int, seconds: float = 5.0) -> None:
    start = time.monotonic()
    while httpx.get(f"{url}/health").json()["in_flight"] > n:
        assert time.monotonic() - start < seconds, "the closed stream's slot was not freed"
        time.sleep(0.02)


def test_api_key_is_required_on_v1_routes(loaded):
    with running(make_app(loaded, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # health and the page stay open
        assert httpx.get(f"{url}/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        r = client(url, "s3cret").completions.create(model="tiny-run", prompt="a", max_tokens=3, seed=1)
        assert r.usage.completion_tokens >= 1


def test_the_page_needs_nothing_from_the_network(server):
    url, _ = server
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/completions" in page and 'id="generate"' in page
    for ref in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert ref not in page


@pytest.mark.slow
def test_cairn_serve_command_serves_and_warns_on_a_public_address(trained_run):
    """The command line end to end: bound to every interface without a key, it warns; the OpenAI
    client gets a completion from it; SIGINT stops it."""
    import signal
    import socket

    with socket.socket() as s:  # a free port (the server binds it again at once)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("CAIRN_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "cairn", "serve", str(trained_run.run), "--host", "0.0.0.0",
                             "--port", str(port), "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "cairn serve did not answer"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = client(url).completions.create(model=trained_run.run.name, prompt="Once", max_tokens=5, seed=2)
        assert r.model == trained_run.run.name and r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "without an API key" in err
    assert "Traceback" not in err


def test_cairn_serve_refuses_a_bad_run_and_a_taken_port(tmp_path, capsys, trained_run):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    with contextlib.closing(bind("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run.run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "\n" not in err
    assert main(["serve", str(trained_run.run), "--max-concurrency", "0"]) == 2
    assert "--max-concurrency" in capsys.readouterr().err


def test_the_engine_turns_token_ids_into_pieces_taking_turns_within_its_batch(loaded):
    """The engine alone, as any route uses it (a chat route would format its messages into token ids):
    ids and settings in, text pieces out. With max_batch=2, four sequences in flight decode two at a
    time and each still gets the text `TextStream` (cairn generate) writes for it."""
    import asyncio

    from cairn.inference.generate import SamplingConfig, TextStream, prompt_ids
    from cairn.serve.engine import Engine, Job

    settings = [SamplingConfig(max_new_tokens=25, temperature=1.0, top_k=20, seed=seed, stop_at_eot=False)
                for seed in range(4)]
    engine = Engine(loaded.model, loaded.tokenizer, max_concurrency=4, max_batch=2)

    async def generate():
        texts, reasons = [""] * 4, [None] * 4
        async for ev in engine.open([Job(prompt_ids(loaded.tokenizer, "Tom went"), s) for s in settings]).events():
            texts[ev.index] += ev.text
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        return texts, reasons

    try:
        texts, reasons = asyncio.run(generate())
    finally:
        engine.close()
    expected = []
    for s in settings:
        stream = TextStream(loaded.model, loaded.tokenizer, "Tom went", s)
        expected.append("".join(stream))
    assert texts == expected and reasons == ["length"] * 4
    assert 1 < engine.rows_decoded / engine.steps <= 2
    assert engine.in_flight == 0


def test_chat_completions_answer_through_the_runs_template_streamed_and_whole(server, loaded):
    """/v1/chat/completions renders the conversation with the run's chat template (as `cairn chat`
    and fine-tuning do) and samples as the completions route does: the official client's streamed
    answer equals its whole answer and the library's answer to the same prompt ids and seed."""
    from cairn.tokenizer import chat_template
    from cairn.tokenizer.chat_template import ChatTemplate
    from cairn.inference.generate import SamplingConfig, generate_text

    url, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Write a story about a red ball."}]
    settings = dict(max_tokens=30, temperature=0.8, seed=11)
    whole = c.chat.completions.create(model="tiny-run", messages=messages, **settings)
    pieces, roles = [], set()
    for chunk in c.chat.completions.create(model="tiny-run", messages=messages, stream=True, **settings):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            roles.add(chunk.choices[0].delta.role)
    ids = chat_template.prompt_ids(ChatTemplate(), loaded.tokenizer, messages)
    ref = generate_text(loaded.model, loaded.tokenizer, "", SamplingConfig(max_new_tokens=30, temperature=0.8,
                                                                           seed=11), prompt_ids=ids)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == "".join(pieces) == ref
    assert roles == {"assistant"} and whole.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages",
     "last message must be the user's"),
    ({"prompt": "Once", "messages": [{"role": "user", "content": "hi"}]}, "prompt", "/v1/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 5},
     "max_completion_tokens", "not both"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", "0 (greedy) or more"),
])
def test_bad_chat_requests_get_a_clean_error_naming_the_field(server, body, param, words):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
