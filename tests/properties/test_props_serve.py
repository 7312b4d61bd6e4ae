"""Generated request bodies for every route of the real serving app (the shared trained run, in process
through Starlette's TestClient): arbitrary JSON of any shape, near-valid completion and chat requests
with drawn field values, and bodies that are not JSON or not UTF-8. Every answer is a success or a 4xx
in OpenAI's error shape, never a 5xx, and the server answers /health after each one."""

from __future__ import annotations

import json
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from hypothesis import given, strategies as st  # noqa: E402

from props_harness import count  # noqa: E402

field_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-2, 40), st.floats(),
                         st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
                         st.lists(st.integers(-5, 2**40), max_size=4),
                         st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=10)
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
                     "repetition_penalty", "echo", "logprobs", "stream_options", "user", "best_of"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
               "stop", "seed"]
messages = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                                             st.text(max_size=5)),
                                           "content": st.one_of(st.text(max_size=20), field_values)}), max_size=3)


@st.composite
def body(draw: st.DrawFn, route: str) -> tuple[bytes, str]:
    """(the request's bytes, its content type)."""
    kind = draw(st.sampled_from(["near", "near", "near", "json", "bytes", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100)), draw(st.sampled_from(["application/json", "text/plain", ""]))
    if kind == "text":
        return draw(st.text(max_size=100)).encode("utf-8", "surrogatepass"), "application/json"
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), "application/json"
    chat = route.endswith("chat/completions")
    doc: dict[str, Any] = ({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Once"})
    doc["max_tokens"] = 2
    for key in draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS) | st.text(max_size=6),
                             max_size=3)):
        doc[key] = draw(messages) if key == "messages" else draw(field_values)
    return json.dumps(doc).encode(), "application/json"


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    from cairn.checkpoint.load import load
    from cairn.serve.app import ServeSettings, create_app

    loaded = load(trained_run.run, "cpu")
    app = create_app(loaded.model, loaded.tokenizer,
                     ServeSettings(model_name="tiny-run", max_concurrency=4, max_body=16_384, max_tokens=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"),
          ("POST", "/v1/models"), ("GET", "/v1/models/tiny-run"), ("POST", "/")]


@given(data=st.data())
def test_every_route_answers_any_body_with_success_or_an_openai_shaped_4xx(client, data):
    count("serve: request bodies")
    method, route = data.draw(st.sampled_from(ROUTES))
    content, kind = data.draw(body(route))
    r = client.request(method, route, content=content, headers={"content-type": kind} if kind else {})
    assert r.status_code < 500, (route, content[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"].strip() and "\n" not in error["message"]
        assert isinstance(error["type"], str)
    assert client.get("/health").status_code == 200
