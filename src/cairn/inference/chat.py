"""`cairn chat RUN`: a conversation with an instruction-tuned run in the terminal.

Each line typed is a user turn; the answer is streamed as it is written. The conversation so far
is the prompt (through the run's chat template), kept while it fits the model's context with room
for an answer; after that its oldest turns are dropped, and the user is told so once. Commands:
/reset (forget the conversation), /temperature T, /quit (or end of input).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator, Optional, TextIO

from cairn.model.transformer import Transformer
from cairn.tokenizer.base import Tokenizer
from cairn.tokenizer.chat_template import ChatTemplate, instruction
from cairn.util.errors import CairnError
from cairn.inference.generate import TextStream
from cairn.inference.sampling import SamplingConfig

HELP = "commands: /reset (forget the conversation), /temperature T (e.g. 0.7), /quit"


class ChatSession:
    """The conversation and how each answer is sampled. `answer(text)` streams one reply."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: ChatTemplate,
                 sampling: SamplingConfig) -> None:
        self.model, self.tokenizer, self.template, self.s = model, tokenizer, template, sampling
        self.history: list[dict[str, str]] = []
        self.turns = 0  # answers given: each is sampled with seed + turns, so a session replays alike
        self.dropping = False  # the oldest turns have had to go (said once)
        ctx = model.cfg.context_len
        self.answer_room = min(sampling.max_new_tokens, ctx // 2)
        self.prompt_limit = ctx - self.answer_room

    def reset(self) -> None:
        self.history = []

    def prompt(self, text: str) -> tuple[list[int], bool]:
        """The ids asking for an answer to `text`, the oldest turns dropped while it does not fit;
        and whether turns were dropped for it."""
        history = list(self.history)
        ids = instruction(self.template, self.tokenizer, text, history)
        dropped = False
        while len(ids) > self.prompt_limit and history:
            history = history[2:] if len(history) >= 2 else []  # a user turn and its answer
            dropped = True
            ids = instruction(self.template, self.tokenizer, text, history)
        if len(ids) > self.prompt_limit:
            raise CairnError(f"the message is {len(ids)} tokens with the template, and the context of "
                             f"{self.model.cfg.context_len} tokens keeps {self.prompt_limit} for it (and "
                             f"{self.answer_room} for the answer): write a shorter one")
        self.history = history
        return ids, dropped

    def answer(self, text: str, on_notice: Callable[[str], None] = lambda _: None) -> Iterator[str]:
        ids, dropped = self.prompt(text)
        if dropped and not self.dropping:
            self.dropping = True
            on_notice(f"(the conversation no longer fits the model's {self.model.cfg.context_len}-token context: "
                      "its oldest turns are left out from now on)")
        stream = TextStream(self.model, self.tokenizer, text, replace(self.s, seed=self.s.seed + self.turns),
                            prompt_ids=ids)
        yield from stream
        self.turns += 1
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": stream.text}]

    def command(self, line: str) -> Optional[str]:
        """Run a /command; returns what to print, or None to quit."""
        name, _, arg = line.strip().partition(" ")
        if name == "/quit":
            return None
        if name == "/reset":
            self.reset()
            return "(conversation forgotten)"
        if name == "/temperature":
            try:
                t = float(arg)
                replace(self.s, temperature=t).check()
            except (ValueError, CairnError):
                return f"(/temperature needs a number >= 0, e.g. /temperature 0.7; it stays {self.s.temperature:g})"
            self.s = replace(self.s, temperature=t)
            return f"(temperature {t:g})"
        return f"(unknown command {name}; {HELP})"


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> None:
    """Read lines until /quit or the end of input, answering each."""
    def notice(message: str) -> None:
        stderr.write(message + "\n")
        stderr.flush()

    if interactive:
        stderr.write(f"Type an instruction and press Enter; {HELP}\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            said = session.command(text)
            if said is None:
                break
            stderr.write(said + "\n")
            stderr.flush()
            continue
        try:
            for piece in session.answer(text, on_notice=notice):
                stdout.write(piece)
                stdout.flush()
        except CairnError as e:
            stderr.write(f"({e})\n")
            continue
        stdout.write("\n")
        stdout.flush()
