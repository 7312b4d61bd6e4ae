"""The text format: stories, every token a target. Training rows are packed windows of the token
stream (`PackedDataset`) or one padded story per row (`PaddedDataset`); held-out stories are scored
one at a time from their own beginning, however training cuts them (`StoryWindows`)."""

from __future__ import annotations

from typing import Optional

from cairn.config.sections import RunConfig
from cairn.data.batching import PackedDataset, PaddedDataset, StoryWindows
from cairn.data.cache import SplitTokens, prepare_data
from cairn.data.formats.base import MainFirst, Rows, RunDatasets
from cairn.data.sources import clean_texts, load_texts
from cairn.tokenizer.base import Tokenizer
from cairn.util.errors import CairnError



class TextFormat:
    name = "text"
    learns_tokenizer = True
    chat = False

    def prepare(self, cfg: RunConfig, tokenizer: Tokenizer, main_first: MainFirst) -> RunDatasets:
        d = cfg.data
        data = main_first(lambda: prepare_data(d, cfg.seed, tokenizer))
        train: Rows = PackedDataset(data.train, d.seq_len) if d.batching == "pack" else PaddedDataset(data.train,
                                                                                                     d.seq_len)
        val, test = (StoryWindows(split, d.seq_len, cfg.eval.stride or None) or None for split in (data.val, data.test))
        unit = "windows" if d.batching == "pack" else "rows"
        if unit == "rows" and len(train) == data.train.n_stories:
            unit = "stories"  # every story fits in one row
        return RunDatasets(train, val, test, str(data.cache_dir), dict(data.meta), unit)

    def held_out(self, cfg: RunConfig, tokenizer: Tokenizer, data: Optional[str], split: str) -> tuple[Rows, str]:
        if data is not None:
            d = cfg.data
            texts = clean_texts(load_texts(data, d.text_field, d.txt_separator, d.hub_split))
            if not texts:
                raise CairnError(f"no text left in {data!r} after dropping empty stories: check the file and its "
                                 "text field")
            stories = SplitTokens.from_texts(texts, tokenizer)
            what = f"{data} ({len(texts)} stories)"
        else:
            stories = prepare_data(cfg.data, cfg.seed, tokenizer).split(split)
            if stories.n_stories == 0:
                raise CairnError(f"the run's {split} split is empty: score the val split, or other data")
            what = f"{split} split ({stories.n_stories} stories)"
        return StoryWindows(stories, cfg.data.seq_len, cfg.eval.stride or None), what


TEXT_FORMAT = TextFormat()
