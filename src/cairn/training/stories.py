"""The stories a run writes at its end, from fixed prompts and seeds, so runs compare by eye."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional, TypedDict

import torch

from cairn.inference.generate import generate_text
from cairn.inference.sampling import STORY
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast
from cairn.tokenizer.base import Tokenizer
from cairn.tokenizer.chat_template import ChatTemplate, prompt_ids, render
from cairn.training.distributed import Dist
from cairn.training.rundir import RunDir

log = logging.getLogger(__name__)

class Story(TypedDict):
    prompt: str
    seed: int
    text: str


END_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "Tom had a big red ball")


def write_stories(model: Transformer, tokenizer: Tokenizer, *, n: int, max_tokens: int, device: torch.device,
                  precision: str, conversations: list[list[dict]], template: Optional[ChatTemplate], title: str,
                  rundir: RunDir, dist: Dist) -> list[Story]:
    """Generate `n` stories, log them and save them to RUN/stories.md. An instruction-tuned run
    (`conversations` and its `template`) answers held-out instructions instead of story openings."""
    stories: list[Story] = []
    model.eval()
    for i in range(n):
        prompt, ids = END_PROMPTS[i % len(END_PROMPTS)], None
        if conversations and template is not None:
            conversation = conversations[i % len(conversations)]
            prompt, ids = render(template, conversation, answer=True), prompt_ids(template, tokenizer, conversation)
        s = replace(STORY, max_new_tokens=max_tokens, seed=i + 1)
        with autocast(device, precision):
            text = generate_text(model, tokenizer, prompt, s, prompt_ids=ids)
        stories.append({"prompt": prompt, "seed": s.seed, "text": prompt + text})
    body = "".join(f"## Story {i + 1} (seed {st['seed']}, temperature {STORY.temperature:g}, top-k {STORY.top_k})"
                   f"\n\n{st['text'].strip()}\n\n"
                   for i, st in enumerate(stories))
    # every rank generated (FSDP needs them all for each forward); rank 0 writes
    dist.on_main(lambda: rundir.write("stories.md", f"# Stories from {title}\n\n" + body), share_result=False)
    for i, st in enumerate(stories):
        log.info(f"story {i + 1}: {st['text'].strip()}")
    log.info(f"stories saved to {rundir.path / 'stories.md'}")
    return stories
