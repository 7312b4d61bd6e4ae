"""The HTTP side of `cairn serve`: a FastAPI app with OpenAI's completion routes, /health and the
playground page. Every error, including unknown routes and wrong methods, is answered in OpenAI's
shape: {"error": {"message", "type", "param", "code"}}."""

# no `from __future__ import annotations`: FastAPI evaluates the routes' annotations, and those name
# dependencies local to create_app, which a string annotation could not find

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, AsyncIterator, Awaitable, Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cairn.tokenizer import chat_template
from cairn.tokenizer.chat_template import ChatTemplate
from cairn.inference.generate import prompt_ids
from cairn.model.transformer import Transformer
from cairn.tokenizer.base import Tokenizer
from cairn.serve.engine import Busy, Engine, Event, Job
from cairn.serve.protocol import ApiError, ChatBody, CompletionBody, CompletionRequest, Limits, validated

Json = dict[str, JsonValue]  # a JSON object of an answer
Choice = Callable[[int, str, Optional[str]], Json]  # a choice of an answer: index, text, finish reason
# the status logged for a request whose client closed the connection before its answer (nginx's
# "client closed request"); the client never sees it
CLIENT_GONE = 499


@dataclass
class ServeSettings:
    model_name: str
    api_key: Optional[str] = None
    max_concurrency: int = 16  # sequences in flight; more get 429
    max_batch: Optional[int] = None  # sequences decoded in one forward pass (None: max_concurrency)
    max_body: int = 1_000_000  # bytes of a request body; more get 413
    max_tokens: int = 2048  # most tokens one completion may ask for
    created: int = 0  # when the checkpoint was written (unix seconds), for /v1/models
    template: ChatTemplate = ChatTemplate()  # how /v1/chat/completions renders a conversation (the run's own)


def create_app(model: Transformer, tokenizer: Tokenizer, settings: ServeSettings) -> FastAPI:
    engine = Engine(model, tokenizer, settings.max_concurrency, settings.max_batch)
    limits = Limits(max_tokens=settings.max_tokens, max_sequences=settings.max_concurrency)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="cairn", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    card: Json = {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "cairn",
                  "context_length": model.cfg.context_len, "tokenizer": tokenizer.name,
                  "parameters": model.num_params()}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect) -> Response:
        # the client closed the connection while sending its body: nothing to answer, nothing to log
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = (f"no route {request.method} {request.url.path}: the routes are GET /, GET /health, "
                   "GET /v1/models, POST /v1/completions, POST /v1/chat/completions") \
            if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message, code=code).body(), status_code=e.status_code)

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest takes as long whatever the key's first wrong byte: the key cannot be guessed by timing
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                "the server's --api-key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # the bodies are read here, not by FastAPI: no further than --max-body, and every error in OpenAI's shape
    async def completion_body(request: Request) -> CompletionBody:
        return validated(CompletionBody, await read_json(request, settings.max_body))

    async def chat_body(request: Request) -> ChatBody:
        return validated(ChatBody, await read_json(request, settings.max_body))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("cairn.serve").joinpath("static/playground.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": settings.model_name, "in_flight": engine.in_flight,
                             "max_concurrency": settings.max_concurrency, "max_batch": engine.max_batch,
                             "decode_steps": engine.steps, "decoded_rows": engine.rows_decoded})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model_card(name: str) -> JSONResponse:
        if name != settings.model_name:
            raise unknown_model(name)
        return JSONResponse(card)

    def served(name: Optional[str]) -> None:
        """Refuse a request that names another model than the served one."""
        if name is not None and name != settings.model_name:
            raise unknown_model(name)

    def unknown_model(name: str) -> ApiError:
        return ApiError(404, f"model {name!r} does not exist: this server serves {settings.model_name!r} "
                             "(see GET /v1/models)", param="model", code="model_not_found")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request, body: Annotated[CompletionBody, Depends(completion_body)]) -> Response:
        prompts = body.prompts()
        r = body.request(limits, len(prompts))
        served(body.model)
        # a prompt longer than the context keeps its end
        jobs = sampling_jobs(r, [prompt_ids(tokenizer, prompt)[-model.cfg.context_len:] for prompt in prompts])
        meta: Json = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                      "model": settings.model_name}
        return await answer(request, r, jobs, meta, choice, choice)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request, body: Annotated[ChatBody, Depends(chat_body)]) -> Response:
        r = body.request(limits)
        messages = body.conversation()
        served(body.model)
        # the conversation rendered as the run was tuned on it; too long for the context, it keeps its end
        ids = chat_template.prompt_ids(settings.template, tokenizer, messages)[-model.cfg.context_len:]
        jobs = sampling_jobs(r, [ids])
        meta: Json = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                      "created": int(time.time()), "model": settings.model_name}
        return await answer(request, r, jobs, meta, chat_choice, chat_delta)

    async def answer(request: Request, r: CompletionRequest, jobs: list[Job], meta: Json, whole: Choice,
                     piece: Choice) -> Response:
        """Run the jobs: a stream of server-sent events (each choice's pieces as `piece` makes them), or
        one JSON answer with every choice (as `whole` makes it)."""
        try:
            generation = engine.open(jobs)
        except Busy as e:
            raise ApiError(429, f"the server is busy ({e}): retry shortly", code="server_busy",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        prompt_tokens = sum(len(j.ids) for j in jobs[::r.n])
        if r.stream:
            chunks = {**meta, "object": f"{meta['object']}.chunk"} if meta["object"] == "chat.completion" else meta
            return StreamingResponse(sse(generation.events(), generation.close, chunks, r, prompt_tokens,
                                         len(jobs), piece),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finish, tokens = [""] * len(jobs), [""] * len(jobs), [0] * len(jobs)

        async def gather() -> None:
            async for ev in generation.events():
                texts[ev.index] += ev.text
                tokens[ev.index] = ev.tokens
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason

        try:
            if not await unless_disconnected(gather(), request):
                return Response(status_code=CLIENT_GONE)
        finally:
            generation.close()
        if "error" in finish:
            raise ApiError(500, "generation failed (see the server's log)", type="server_error", code="internal")
        return JSONResponse({**meta, "choices": [whole(i, t, f) for i, (t, f) in enumerate(zip(texts, finish))],
                             "usage": usage(prompt_tokens, sum(tokens))})

    return app


async def unless_disconnected(work: Awaitable[None], request: Request) -> bool:
    """Run `work` unless the client closes the connection first, and say whether it ran to its end. A
    whole (not streamed) answer is sent only when complete: without this, a client that left would
    keep its slots, and the worker decoding for nobody, until then."""
    done, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, gone):
            task.cancel()
        await asyncio.gather(done, gone, return_exceptions=True)
    if done.cancelled():
        return False
    done.result()  # its exception, if any
    return True


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection. The body has been read: the next message
    the server gives the app is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, limit: int) -> JsonValue:
    """The body parsed as JSON, read no further than `limit` bytes."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes (the server's --max-body)",
                       code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise too_big
    try:
        body: JsonValue = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}): send a JSON object",
                       code="invalid_json") from None
    return body


def sampling_jobs(r: CompletionRequest, prompts: list[list[int]]) -> list[Job]:
    """n jobs per prompt (token ids), in OpenAI's order (prompt by prompt, n choices each). Choice i
    of a prompt is sampled with seed + i, as `cairn generate --num-samples` does, so the text of seed
    S equals `cairn generate --seed S` with the same settings."""
    return [Job(ids, s) for ids in prompts for s in r.choices()]


def _reason(finish: Optional[str]) -> Optional[str]:
    # "eot" (the model ended the text) is OpenAI's "stop": clients know only stop and length
    return None if finish is None else "length" if finish == "length" else "stop"


def choice(index: int, text: str, finish: Optional[str]) -> Json:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": _reason(finish)}


def chat_choice(index: int, text: str, finish: Optional[str], delta: bool = False) -> Json:
    """A chat answer's choice: its whole message, or (`delta`, streaming) the piece just written."""
    key = "delta" if delta else "message"
    return {"index": index, key: {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": _reason(finish)}


def chat_delta(index: int, text: str, finish: Optional[str]) -> Json:
    return chat_choice(index, text, finish, delta=True)


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def sse(events: AsyncIterator[Event], close: Callable[[], None], meta: Json, r: CompletionRequest,
              prompt_tokens: int, n_choices: int, piece: Choice = choice) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. The usage comes in the
    last chunk with a choice, or with include_usage in a chunk of its own after it (as OpenAI sends it);
    with continuous_usage_stats in every chunk."""
    tokens: dict[int, int] = {}
    open_choices = n_choices
    so_far = usage(prompt_tokens, 0)
    try:
        async for ev in events:
            tokens[ev.index] = ev.tokens
            if ev.finish_reason == "error":
                err = ApiError(500, "generation failed (see the server's log)", type="server_error", code="internal")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            if ev.finish_reason is not None:
                open_choices -= 1
            chunk: Json = {**meta, "choices": [piece(ev.index, ev.text, ev.finish_reason)]}
            so_far = usage(prompt_tokens, sum(tokens.values()))
            if r.continuous_usage or (open_choices == 0 and not r.include_usage):
                chunk["usage"] = so_far
            yield f"data: {json.dumps(chunk)}\n\n"
        else:
            if r.include_usage:
                yield f"data: {json.dumps({**meta, 'choices': [], 'usage': so_far})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        close()  # also when the client went away: its sequences stop and free their slots now
