"""How an instruction-tuned run turns a conversation into tokens: one function for training, chat and serving.

A template is four format strings, saved in the run's config ([chat] template_*): a system turn, a
user turn, an assistant turn (`{content}` marks where the answer goes; the text before it is the
prompt that asks the model to answer) and the separator written after an assistant turn that is not
the last. A conversation becomes

    <|endoftext|> system? user assistant-prefix ANSWER separator user assistant-prefix ANSWER <|endoftext|>

The leading <|endoftext|> starts it as every story starts in training; the trailing one ends it, so
a tuned model stops after its answer. Training takes the loss on the answers (and what ends them)
only. Every text run between answers is tokenized as one string, the same way whether the
conversation is training data or a prompt being answered, so the model sees at inference exactly
the tokens it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant")
SLOT = "{content}"


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "{content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}"
    separator: str = "\n"

    @classmethod
    def from_config(cls, data_cfg: Any) -> "ChatTemplate":
        """The template a run's [chat] section holds (template_system, _user, _assistant, _separator)."""
        return cls(data_cfg.template_system, data_cfg.template_user, data_cfg.template_assistant,
                   data_cfg.template_separator).check()

    def check(self) -> "ChatTemplate":
        for role in ROLES:
            text = getattr(self, role)
            if text.count(SLOT) != 1:
                raise CairnError(f"chat.template_{role} {text!r} must hold {SLOT} exactly once: "
                                 f"change {option('template_')}{role}")
        if "<|endoftext|>" in "".join((self.system, self.user, self.assistant, self.separator)):
            raise CairnError("the chat template must not hold <|endoftext|>: it ends every conversation "
                             f"and separates packed examples; change {option('template_')}*")
        return self

    def answer_prefix(self) -> str:
        """What the prompt ends with: the assistant turn up to its answer."""
        return self.assistant.split(SLOT)[0]

    def segments(self, messages: Sequence[dict], answer: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, is_answer) pieces, without the <|endoftext|> around it.
        With `answer` it ends with the assistant's prefix: the prompt for the next answer."""
        out: list[tuple[str, bool]] = []
        n = len(messages)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            before, after = getattr(self, role).split(SLOT)
            if role != "assistant":
                out += [(before + content + after, False)]
                continue
            out += [(before, False), (content, True)]
            tail = after + (self.separator if i < n - 1 or answer else "")
            if tail:
                out.append((tail, True))
        if answer:
            out.append((self.answer_prefix(), False))
        return [(text, target) for text, target in out if text]


def check_messages(messages: Any, where: str = "messages") -> list[dict]:
    """`messages` as [{"role", "content"}] with known roles and text contents, or one line saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise CairnError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise CairnError(f"{where}: message {k} has no text 'content': give "
                             f"{{\"role\": ..., \"content\": \"...\"}}")
        if m.get("role") not in ROLES:
            raise CairnError(f"{where}: message {k} has unknown role {m.get('role')!r}: use one of "
                             f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Neighbouring pieces of the same kind as one text (tokenized together)."""
    merged: list[tuple[str, bool]] = []
    for text, target in segments:
        if merged and merged[-1][1] == target:
            merged[-1] = (merged[-1][0] + text, target)
        else:
            merged.append((text, target))
    return merged


def encode_conversation(template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[dict],
                        answer: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per id, whether it is an answer token (a training target).

    Training (`answer=False`): the conversation must end with an assistant turn, and ends with
    <|endoftext|> (a target). Prompting (`answer=True`): it ends with the assistant's prefix, ready
    for the model to write the answer. Ids start with <|endoftext|>, as every story does."""
    ids, target = [tokenizer.eot_id], [False]
    for text, is_answer in _merge(template.segments(messages, answer)):
        piece = tokenizer.encode(text)
        ids += piece
        target += [is_answer] * len(piece)
    if not answer:
        ids.append(tokenizer.eot_id)
        target.append(True)
    return ids, target


def prompt_ids(template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids a model continues to answer the conversation's last user turn."""
    return encode_conversation(template, tokenizer, messages, answer=True)[0]


def render(template: ChatTemplate, messages: Sequence[dict], answer: bool = False) -> str:
    """The conversation as text (without the <|endoftext|> around it), e.g. to show or log it."""
    return "".join(text for text, _ in template.segments(messages, answer))


def instruction(template: ChatTemplate, tokenizer: Tokenizer, prompt: str,
                history: Optional[Sequence[dict]] = None) -> list[int]:
    """The ids that ask for an answer to `prompt` after `history` (earlier turns)."""
    return prompt_ids(template, tokenizer, [*(history or []), {"role": "user", "content": prompt}])
