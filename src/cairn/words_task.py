"""`cairn eval RUN --task words --data F`: does the model write stories that use the words asked for?

F holds JSONL records with a `prompt` ("Write a story that uses the words: w1, w2, w3.") and its
`words`. Each prompt is put through the run's chat template (the one it was tuned with; a base run
gets the default template, the same text) and one story is sampled per prompt with a fixed seed
(the record's position + --seed). A story honours its prompt when every word occurs in it as a
whole word, case-insensitively ("cat" is not found in "cats" or "scatter"). The figure is the
fraction of prompts honoured.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

from . import jsonl
from .chat_template import ChatTemplate, instruction
from .errors import CairnError
from .generate import SamplingConfig, TextStream
from .loading import load

WORD = re.compile(r"[A-Za-z]+")


def words_found(text: str, words: list[str]) -> int:
    """How many of `words` occur in `text` as whole words, case-insensitively."""
    present = {w.lower() for w in WORD.findall(text)}
    return sum(w.lower() in present for w in words)


def uses_all(text: str, words: list[str]) -> bool:
    return words_found(text, words) == len(words)


def read_word_prompts(path: str | Path) -> list[dict]:
    out = []
    for n, r in jsonl.records(path, "word prompts file (--data)"):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("words"), list)
                and r["words"] and all(isinstance(w, str) and WORD.fullmatch(w) for w in r["words"])):
            raise CairnError(f"{path}:{n}: needs a text 'prompt' and a list of 'words' (letters only), e.g. "
                             "{\"prompt\": \"Write a story that uses the words: cat, hat, sun.\", "
                             "\"words\": [\"cat\", \"hat\", \"sun\"]}")
        out.append({"prompt": r["prompt"], "words": r["words"]})
    if not out:
        raise CairnError(f"--data {str(path)!r} holds no prompt")
    return out


def evaluate_words(run: str | Path, data: str | Path, *, device: str = "auto", seed: int = 0,
                   max_new_tokens: int = 300, temperature: float = 0.8, top_k: int = 50,
                   limit: int = 0, on_sample: Optional[callable] = None) -> dict:
    """One story per prompt of `data` from the model at `run`; the fraction that use all their words."""
    prompts = read_word_prompts(data)[:limit or None]
    loaded = load(run, device, merge=True)
    template = ChatTemplate.from_config(loaded.config.data)
    samples, honoured, started = [], 0, time.perf_counter()
    for i, p in enumerate(prompts):
        s = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i)
        stream = TextStream(loaded.model, loaded.tokenizer, p["prompt"], s,
                            prompt_ids=instruction(template, loaded.tokenizer, p["prompt"]))
        for _ in stream:
            pass
        ok = uses_all(stream.text, p["words"])
        honoured += ok
        sample = {"prompt": p["prompt"], "words": p["words"], "seed": s.seed, "story": stream.text, "honoured": ok,
                  "words_found": words_found(stream.text, p["words"]), "finish_reason": stream.finish_reason}
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
    asked = sum(len(p["words"]) for p in prompts)
    return {"checkpoint": str(loaded.path), "prompts": len(prompts), "honoured": honoured,
            "rate": honoured / len(prompts), "word_rate": sum(x["words_found"] for x in samples) / asked,
            "sampling": {"temperature": temperature, "top_k": top_k,
                                                          "max_new_tokens": max_new_tokens, "seeds": f"{seed}.."},
            "seconds": round(time.perf_counter() - started, 1), "samples": samples}
