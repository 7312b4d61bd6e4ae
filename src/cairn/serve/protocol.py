"""OpenAI's completion request, checked field by field: each bad value is an `ApiError` that names
the field and says what is allowed, answered as OpenAI answers it ({"error": {message, type, param,
code}} with a 4xx status)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per request
MAX_STOP = 4  # stop strings, as OpenAI allows
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass
class CompletionRequest:
    prompts: list[str]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    stream: bool = False
    include_usage: bool = False  # stream_options: a last chunk with no choices and the usage
    continuous_usage: bool = False  # stream_options (vLLM's extension): the usage so far in every chunk
    ignore_eos: bool = False  # vLLM's extension: go on past <|endoftext|> up to max_tokens
    repetition_penalty: float = 1.0


# fields of OpenAI's request that cairn does not implement: accepted only at their neutral value
# (clients send some of them with it), each as (is it neutral?, what is allowed)
NEUTRAL = {
    "echo": (lambda v: v is None or v is False, "false"),
    "logprobs": (lambda v: v is None, "null"),
    "best_of": (lambda v: v is None or (_is_int(v) and v == 1), "1"),
    "suffix": (lambda v: v is None, "null"),
    "frequency_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0"),
    "presence_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0"),
    "logit_bias": (lambda v: v is None or v == {}, "{}"),
    "user": (lambda v: v is None or isinstance(v, str), "any string (unused)"),
}
KNOWN = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
         "stream_options", "ignore_eos", "repetition_penalty", *NEUTRAL)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body: dict, name: str, default: int, low: int, high: int, what: str) -> int:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(name, f"'{name}' must be an integer ({what}), got {type(v).__name__} {v!r}")
    if not low <= v <= high:
        raise bad(name, f"'{name}' must be from {low} to {high} ({what}), got {v}")
    return v


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(name, f"'{name}' must be a number, got {type(v).__name__} {v!r}")
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {type(v).__name__} {v!r}")
    return v


def parse_completion(body: Any, max_tokens_limit: int, max_sequences: int) -> CompletionRequest:
    """The request from a parsed JSON body, or ApiError for the first field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                       code="invalid_json")
    for name in body:
        if name not in KNOWN:
            raise bad(name, f"unknown field '{name}': supported fields are {', '.join(KNOWN)}")
    for name, (neutral, allowed) in NEUTRAL.items():
        if not neutral(body.get(name)):
            raise bad(name, f"'{name}' is not supported by cairn: leave it out or give {allowed}, "
                            f"got {body.get(name)!r}")

    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt", "'prompt' is required: a string, or a non-empty list of strings"
                  + ("" if prompt is None else f", got {type(prompt).__name__}"))
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"'prompt' holds {len(prompts)} prompts: at most {MAX_PROMPTS} per request")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise bad("prompt", "'prompt' is not valid UTF-8 text (it holds a lone surrogate)") from None

    r = CompletionRequest(prompts=prompts)
    r.max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, max_tokens_limit, "tokens to generate")
    r.temperature = _number(body, "temperature", 1.0)
    if r.temperature < 0:
        raise bad("temperature", f"'temperature' must be 0 (greedy) or more, got {r.temperature:g}")
    r.top_p = _number(body, "top_p", 1.0)
    if not 0 < r.top_p <= 1:
        raise bad("top_p", f"'top_p' must be in (0, 1] (1 = off), got {r.top_p:g}")
    r.top_k = _int(body, "top_k", 0, 0, 2**31 - 1, "0 = off")
    r.n = _int(body, "n", 1, 1, MAX_N, "choices per prompt")
    if len(prompts) * r.n > max_sequences:
        raise bad("n", f"{len(prompts)} prompt(s) x n={r.n} asks for {len(prompts) * r.n} sequences, more than "
                       f"the server runs at once ({max_sequences}, its --max-concurrency): ask for fewer")
    r.repetition_penalty = _number(body, "repetition_penalty", 1.0)
    if r.repetition_penalty <= 0:
        raise bad("repetition_penalty", f"'repetition_penalty' must be positive (1 = off), got "
                                        f"{r.repetition_penalty:g}")

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {type(stop).__name__}")
    if stop and len(stop) > MAX_STOP:
        raise bad("stop", f"'stop' holds {len(stop)} strings: at most {MAX_STOP}")
    r.stop = [s for s in stop or [] if s]

    seed = body.get("seed")
    if seed is None:
        r.seed = secrets.randbelow(2**31)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise bad("seed", f"'seed' must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    else:
        r.seed = seed

    r.stream = _bool(body, "stream")
    r.ignore_eos = _bool(body, "ignore_eos")
    options = body.get("stream_options")
    if options is not None:
        if not r.stream:
            raise bad("stream_options", "'stream_options' is only allowed with \"stream\": true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", "'stream_options' must be an object with include_usage and/or "
                                        "continuous_usage_stats (true or false)")
        r.include_usage = _bool(options, "include_usage")
        r.continuous_usage = _bool(options, "continuous_usage_stats")
    return r


def parse_chat(body: Any, max_tokens_limit: int, max_sequences: int) -> tuple[CompletionRequest, list[dict]]:
    """OpenAI's chat completion request: `messages` instead of `prompt`, the other fields as a
    completion's (`max_completion_tokens` is the newer name of `max_tokens`)."""
    from cairn.tokenizer.chat_template import check_messages
    from cairn.util.errors import CairnError

    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                       code="invalid_json")
    if "prompt" in body:
        raise bad("prompt", "chat completions take 'messages', not 'prompt': send a prompt to /v1/completions")
    rest = {k: v for k, v in body.items() if k != "messages"}
    if "max_completion_tokens" in rest:
        if "max_tokens" in rest:
            raise bad("max_completion_tokens", "give 'max_completion_tokens' or 'max_tokens', not both")
        rest["max_tokens"] = rest.pop("max_completion_tokens")
    r = parse_completion({**rest, "prompt": ""}, max_tokens_limit, max_sequences)
    try:
        messages = check_messages(body.get("messages"))
    except CairnError as e:
        raise bad("messages", str(e)) from None
    if messages[-1]["role"] != "user":
        raise bad("messages", f"the last message must be the user's (the one to answer), got "
                              f"{messages[-1]['role']!r}")
    return r, messages
