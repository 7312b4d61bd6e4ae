"""OpenAI's completion and chat completion requests as pydantic models. Pydantic checks each field's
JSON type; the sampling settings, under OpenAI's names (`max_tokens`, `stop`, ...), become a
`SamplingConfig` whose own `check()` says which values are allowed; the request's limits on this
server (choices, prompts, stop strings, tokens) are checked here. Each bad value is an `ApiError`
that names the field and says what is allowed, answered as OpenAI answers it ({"error": {message,
type, param, code}} with a 4xx status)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError
from pydantic_core import ErrorDetails

from cairn.inference.sampling import OPENAI, SamplingConfig, SamplingError
from cairn.tokenizer.chat_template import check_messages
from cairn.util.errors import CairnError

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per request
MAX_STOP = 4  # stop strings, as OpenAI allows
RANDOM_SEEDS = 2**31  # a request without a seed gets one below this

ErrorBody = dict[str, dict[str, Optional[str]]]


class ApiError(Exception):
    """A request that cannot be answered: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> ErrorBody:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class Limits:
    """What this server allows one request: tokens per completion (--max-tokens), sequences at once
    (--max-concurrency)."""
    max_tokens: int
    max_sequences: int


@dataclass(frozen=True)
class CompletionRequest:
    """A request's checked settings: how choice 0 is sampled (choice i with seed + i, as `cairn generate
    --num-samples`), how many choices each prompt gets, and how the answer is sent."""
    sampling: SamplingConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options: a last chunk with no choices and the usage
    continuous_usage: bool = False  # stream_options (vLLM's extension): the usage so far in every chunk

    def choices(self) -> list[SamplingConfig]:
        return self.sampling.seeds(self.n)


T = TypeVar("T")


def _given(value: Optional[T], default: T) -> T:
    return default if value is None else value


def _is_int(v: JsonValue) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: JsonValue) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# fields of OpenAI's request that cairn does not implement: accepted only at their neutral value
# (clients send some of them with it), each as (is it neutral?, what is allowed)
NEUTRAL: dict[str, tuple[Callable[[JsonValue], bool], str]] = {
    "echo": (lambda v: v is None or v is False, "false"),
    "logprobs": (lambda v: v is None, "null"),
    "best_of": (lambda v: v is None or (_is_int(v) and v == 1), "1"),
    "suffix": (lambda v: v is None, "null"),
    "frequency_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0"),
    "presence_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0"),
    "logit_bias": (lambda v: v is None or v == {}, "{}"),
    "user": (lambda v: v is None or isinstance(v, str), "any string (unused)"),
}

# what a field of each JSON type must hold, by pydantic's error type, for the error message
EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
            "float_type": "a number", "float_parsing": "a number", "finite_number": "a number",
            "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM's


class RequestFields(BaseModel):
    """The fields both routes take: the sampling settings under OpenAI's names, the number of choices,
    streaming, and OpenAI's fields that cairn accepts only at their neutral value."""
    # strict: JSON's types as they are (2.5 is no integer, "1" no number, 1 no boolean)
    model_config = ConfigDict(extra="forbid", strict=True)
    HIDDEN: ClassVar[tuple[str, ...]] = ()  # fields declared only to be refused with a better message

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # an extension, as vLLM's
    repetition_penalty: Optional[float] = None  # an extension, as vLLM's
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = None  # vLLM's extension: go on past <|endoftext|> up to max_tokens
    echo: JsonValue = None
    logprobs: JsonValue = None
    best_of: JsonValue = None
    suffix: JsonValue = None
    frequency_penalty: JsonValue = None
    presence_penalty: JsonValue = None
    logit_bias: JsonValue = None
    user: JsonValue = None

    def request(self, limits: Limits, prompts: int) -> CompletionRequest:
        """The checked settings for `prompts` prompts, or ApiError for the first field that is wrong."""
        for name, (neutral, allowed) in NEUTRAL.items():
            value = getattr(self, name)
            if not neutral(value):
                raise bad(name, f"'{name}' is not supported by cairn: leave it out or give {allowed}, got {value!r}")
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_N:
            raise bad("n", f"'n' must be from 1 to {MAX_N} (choices per prompt), got {n}")
        if prompts * n > limits.max_sequences:
            raise bad("n", f"{prompts} prompt(s) x n={n} asks for {prompts * n} sequences, more than the server "
                           f"runs at once ({limits.max_sequences}, its --max-concurrency): ask for fewer")
        stream = bool(self.stream)
        if self.stream_options is not None and not stream:
            raise bad("stream_options", "'stream_options' is only allowed with \"stream\": true")
        options = self.stream_options or StreamOptions()
        return CompletionRequest(self._sampling(limits, n), n, stream, bool(options.include_usage),
                                 bool(options.continuous_usage_stats))

    def _sampling(self, limits: Limits, n: int) -> SamplingConfig:
        """The sampling settings given, over OpenAI's defaults, checked for every choice."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > MAX_STOP:
            raise bad("stop", f"'stop' holds {len(stop)} strings: at most {MAX_STOP}")
        d = OPENAI  # what a field left out (or null) means
        s = SamplingConfig(max_new_tokens=_given(self._max_tokens(), d.max_new_tokens),
                           temperature=_given(self.temperature, d.temperature), top_k=_given(self.top_k, d.top_k),
                           top_p=_given(self.top_p, d.top_p),
                           repetition_penalty=_given(self.repetition_penalty, d.repetition_penalty),
                           stop=d.stop if stop is None else tuple(stop),
                           seed=secrets.randbelow(RANDOM_SEEDS) if self.seed is None else self.seed,
                           stop_at_eot=not self.ignore_eos)
        self._check(s, limits)
        try:
            s.seeds(n)[-1].check(limits.max_tokens)
        except SamplingError as e:  # only the seed differs between choices
            raise bad("seed", f"'seed' + n - 1 (the last choice's seed) {e.rule}") from None
        return s

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def _param(self, setting: str) -> str:
        """The request's field that gave a sampling setting (OpenAI's names are mostly cairn's)."""
        return "max_tokens" if setting == "max_new_tokens" else setting

    def _check(self, s: SamplingConfig, limits: Limits) -> None:
        try:
            s.check(limits.max_tokens)
        except SamplingError as e:
            param = self._param(e.field)
            raise bad(param, e.named(f"'{param}'")) from None


class CompletionBody(RequestFields):
    """POST /v1/completions: a prompt, or several, to continue."""

    prompt: Union[str, list[str]]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise bad("prompt", "'prompt' is required: a string, or a non-empty list of strings, got an empty list")
        if len(prompts) > MAX_PROMPTS:
            raise bad("prompt", f"'prompt' holds {len(prompts)} prompts: at most {MAX_PROMPTS} per request")
        for p in prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("prompt", "'prompt' is not valid UTF-8 text (it holds a lone surrogate)") from None
        return prompts


class ChatBody(RequestFields):
    """POST /v1/chat/completions: `messages` instead of `prompt`, the other fields as a completion's
    (`max_completion_tokens` is the newer name of `max_tokens`)."""
    HIDDEN: ClassVar[tuple[str, ...]] = ("prompt",)

    messages: JsonValue = None  # checked by `check_messages`, as a conversation of fine-tuning data is
    max_completion_tokens: Optional[int] = None
    prompt: JsonValue = None  # a completion's field: refused with where to send it

    def request(self, limits: Limits, prompts: int = 1) -> CompletionRequest:
        if "prompt" in self.model_fields_set:
            raise bad("prompt", "chat completions take 'messages', not 'prompt': send a prompt to /v1/completions")
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            raise bad("max_completion_tokens", "give 'max_completion_tokens' or 'max_tokens', not both")
        return super().request(limits, prompts)

    def _max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def _param(self, setting: str) -> str:
        if setting == "max_new_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super()._param(setting)

    def conversation(self) -> list[dict[str, str]]:
        """The messages, the last one the user's (the one to answer)."""
        try:
            messages = check_messages(self.messages)
        except CairnError as e:
            raise bad("messages", str(e)) from None
        if messages[-1]["role"] != "user":
            raise bad("messages", f"the last message must be the user's (the one to answer), got "
                                  f"{messages[-1]['role']!r}")
        return messages


Body = TypeVar("Body", bound=RequestFields)


def validated(model: type[Body], body: JsonValue) -> Body:
    """`body` (parsed JSON) as a `model`, or ApiError for its first wrong field (an unknown one first)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        unknown = [x for x in errors if x["type"] == "extra_forbidden" and len(x["loc"]) == 1]
        raise _api_error(model, (unknown or errors)[0]) from None


def _api_error(model: type[RequestFields], error: ErrorDetails) -> ApiError:
    """A pydantic error as cairn's answer to it: what the field must hold, and what it got."""
    loc, value = error["loc"], error["input"]
    got = f"got {type(value).__name__} {value!r}"
    if not loc:
        return ApiError(400, f"the request body must be a JSON object, got a JSON {type(value).__name__}",
                        code="invalid_json")
    name = str(loc[0])
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        supported = [f for f in model.model_fields if f not in model.HIDDEN]
        return bad(name, f"unknown field {name!r}: supported fields are {', '.join(supported)}")
    if name == "prompt":
        return bad(name, "'prompt' is required: a string, or a non-empty list of strings"
                   + ("" if error["type"] == "missing" else f", got {type(value).__name__}"))
    if name == "stop":
        return bad(name, f"'stop' must be a string or a list of strings, got {type(value).__name__}")
    if name == "stream_options":
        return bad(name, "'stream_options' must be an object with include_usage and/or continuous_usage_stats "
                         "(true or false)")
    return bad(name, f"'{name}' must be {EXPECTED.get(error['type'], 'of another type')}, {got}")
