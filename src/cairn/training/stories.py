"""The stories a run writes at its end, from fixed prompts and seeds, so runs compare by eye."""

from __future__ import annotations

import logging

from cairn.tokenizer.chat_template import ChatTemplate, prompt_ids, render
from cairn.data.sft import sample_conversations
from cairn.inference.generate import SamplingConfig, generate_text
from cairn.runtime.device import autocast

log = logging.getLogger(__name__)

END_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "Tom had a big red ball")


def write_stories(trainer) -> list[dict]:
    """Generate `end_stories` stories, log them and save them to RUN/stories.md."""
    t, stories = trainer.cfg.train, []
    trainer.model.eval()
    # an instruction-tuned run answers held-out instructions, through its chat template
    asks = sample_conversations(trainer.data, t.end_stories) if trainer.cfg.data.format == "sft" else []
    template = ChatTemplate.from_config(trainer.cfg.data)
    for i in range(t.end_stories):
        prompt, ids = END_PROMPTS[i % len(END_PROMPTS)], None
        if asks:
            conversation = asks[i % len(asks)]
            prompt, ids = render(template, conversation, answer=True), prompt_ids(template, trainer.tokenizer,
                                                                                  conversation)
        s = SamplingConfig(max_new_tokens=t.end_story_tokens, temperature=0.8, top_k=50, seed=i + 1)
        with autocast(trainer.device, trainer.precision):
            text = generate_text(trainer.model, trainer.tokenizer, prompt, s, prompt_ids=ids)
        stories.append({"prompt": prompt, "seed": s.seed, "text": prompt + text})
    body = "".join(f"## Story {i + 1} (seed {st['seed']}, temperature 0.8, top-k 50)\n\n{st['text'].strip()}\n\n"
                   for i, st in enumerate(stories))
    # every rank generated (FSDP needs them all for each forward); rank 0 writes
    text = f"# Stories from {trainer.cfg.name}, step {trainer.state.step}\n\n" + body
    trainer.dist.on_main(lambda: trainer.rundir.write("stories.md", text), share_result=False)
    for i, st in enumerate(stories):
        log.info(f"story {i + 1}: {st['text'].strip()}")
    log.info(f"stories saved to {trainer.rundir.path / 'stories.md'}")
    return stories
