"""The lm-evaluation-harness tasks cairn ships for story models, built from a run's held-out stories.

`cairn_story_ppl` scores each story whole (word and byte perplexity, bits per byte);
`cairn_story_ending` asks which of several sentences ends a story. Their task files
(`harness_tasks/*.yaml`) name no data: `write_tasks` writes the stories and the choices into a
folder with a task file per task that includes the shipped one and points it at its data, and
lm-eval's `TaskManager(include_path=folder)` finds them, offline."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cairn.checkpoint.load import Loaded
from cairn.data.batching import StoryWindows
from cairn.data.formats import get_format
from cairn.util.errors import CairnError

TASKS_DIR = Path(__file__).parent / "harness_tasks"
PPL, ENDING = "cairn_story_ppl", "cairn_story_ending"
TAG = "cairn_stories"  # both
LOCAL_TASKS = (PPL, ENDING)
N_CHOICES = 4

# a sentence ends at . ! or ? (or one and a closing quote) before whitespace and a capital letter or an
# opening quote: `"Can I keep it?" she asked.` is one sentence
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019]))\s+(?=[A-Z\"'\u201c\u2018])")


def held_out_stories(loaded: Loaded, data: Optional[str], split: str) -> tuple[list[str], str]:
    """The stories `cairn eval` scores for this run (every story of `data`, or the run's `split`),
    as text, and what they are. They are read back from the tokens `cairn eval` scores, so both
    see the same stories, in the same order."""
    cfg, tok = loaded.config, loaded.tokenizer
    if cfg.data.format != "text":
        raise CairnError(f"the story tasks ({', '.join(LOCAL_TASKS)}) score stories, and this run trained on "
                         f"{cfg.data.format} records: give lm-eval's own tasks instead")
    rows, what = get_format(cfg.data.format).held_out(cfg, tok, data, split)
    assert isinstance(rows, StoryWindows)
    stories = rows.split
    texts = [tok.decode_bytes(stories.story(i)[:-1].tolist()).decode("utf-8") for i in range(stories.n_stories)]
    return texts, what


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@dataclass(frozen=True)
class EndingItem:
    context: str  # the story up to its last sentence
    choices: list[str]
    label: int  # the index of the story's own last sentence

    def record(self) -> dict:
        return {"context": self.context, "choices": self.choices, "label": self.label}


def ending_items(texts: Sequence[str], seed: int, n_choices: int = N_CHOICES) -> list[EndingItem]:
    """For every story of two sentences or more: the story without its last sentence, and as
    choices that sentence and the last sentences of `n_choices - 1` other stories (different
    texts), in a seeded random order. The same stories and seed give the same items."""
    split = [(i, sentences(t)) for i, t in enumerate(texts)]
    usable = [(i, s) for i, s in split if len(s) >= 2]
    endings = [s[-1] for _, s in usable]
    if len(set(endings)) < n_choices:
        raise CairnError(f"{ENDING} needs stories with at least {n_choices} different last "
                         f"sentences, and these {len(texts)} stories have {len(set(endings))}: give more stories")
    rng = random.Random(seed)
    items = []
    for i, s in usable:
        true = s[-1]
        context = texts[i].strip()
        context = context[:context.rindex(true)].rstrip()
        others: list[str] = []
        while len(others) < n_choices - 1:
            other = endings[rng.randrange(len(endings))]
            if other != true and other not in others:
                others.append(other)
        label = rng.randrange(n_choices)
        choices = others[:label] + [true] + others[label:]
        items.append(EndingItem(context, choices, label))
    return items


def _write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _task_file(directory: Path, task: str, data: Path) -> None:
    # JSON is YAML: the task file includes the shipped one and adds its data; datasets' own cache
    # of the parsed file goes beside it, not into the user's ~/.cache
    spec = {"include": str(TASKS_DIR / f"{task}.yaml"),
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "datasets")}}
    (directory / f"{task}.yaml").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def write_tasks(directory: Path, texts: Sequence[str], seed: int, tasks: Sequence[str] = LOCAL_TASKS) -> Path:
    """Write the data and the task files of `tasks` (of LOCAL_TASKS) for these stories into `directory`."""
    if not texts:
        raise CairnError("no stories to build the story tasks from")
    directory.mkdir(parents=True, exist_ok=True)
    if PPL in tasks:
        _task_file(directory, PPL, _write_jsonl(directory / "stories.jsonl", [{"text": t} for t in texts]))
    if ENDING in tasks:
        items = [item.record() for item in ending_items(texts, seed)]
        _task_file(directory, ENDING, _write_jsonl(directory / "endings.jsonl", items))
    return directory
