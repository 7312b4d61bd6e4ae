"""The hub path for real: `datasets.load_dataset` on cairn's default hub id, offline, against a hub
cache laid out as huggingface_hub lays it out when it downloads roneneldan/TinyStories.

huggingface_hub and datasets read HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when they are imported,
so every check runs in a fresh Python process with those set: the id, the split selection, the text
field and the error messages go through the same calls as online, only the files come from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cairn.config.sections import DataConfig
from conftest import REPO, make_stories

# `cairn prepare` processes and hub loads through datasets: seconds each
pytestmark = pytest.mark.slow

HUB_ID = DataConfig().source  # the default the main job trains on
REVISION = "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"  # a commit hash, as refs/main holds one
CARD = """---
license: cdla-sharing-1.0
task_categories:
- text-generation
language:
- en
---
Stories written by GPT-3.5 and GPT-4 with the vocabulary of a 3-4 year old.
"""


def _add_file(repo: Path, path_in_repo: str, content: bytes) -> None:
    """One file of a snapshot as huggingface_hub stores it: the bytes in blobs/ under their hash, and
    snapshots/<revision>/<path> a relative symlink to the blob."""
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / REVISION / path_in_repo
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _parquet(texts: list[str]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> tuple[Path, dict]:
    """HF_HOME holding the dataset repo's snapshot (the card and the parquet files of its train and
    validation splits, named as on the hub), and the stories each split holds."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / ("datasets--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    stories = make_stories(300, seed=7)
    splits = {"train": stories[:240] + ["", "   "], "validation": stories[240:]}  # two empty stories to drop
    _add_file(repo, "README.md", CARD.encode())
    _add_file(repo, "data/train-00000-of-00001-5852b56a2bd28fd9.parquet", _parquet(splits["train"]))
    _add_file(repo, "data/validation-00000-of-00001-869c898b519ad725.parquet", _parquet(splits["validation"]))
    return home, splits


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    env.update({k: v for k, v in extra.items() if v is not None})
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
    return env


# Each call is cairn's own: load_texts -> source_chunks -> datasets.load_dataset(...), as a run does.
LOAD = """
import json, sys
from cairn.data.sources import load_texts
from cairn.util.errors import CairnError
out = []
for kwargs in json.loads(sys.argv[1]):
    try:
        out.append({"texts": load_texts(**kwargs)})
    except CairnError as e:
        out.append({"error": e.for_cli()})
print(json.dumps(out))
"""


def _load(home: Path, calls: list[dict], **env) -> list[dict]:
    p = subprocess.run([sys.executable, "-c", LOAD, json.dumps(calls)], env=_env(home, **env),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_default_hub_id_loads_its_splits_offline_from_the_hub_cache(hub_home):
    home, splits = hub_home
    train, val, bad_split, bad_field = _load(home, [
        {"source": HUB_ID},
        {"source": HUB_ID, "hub_split": "validation"},
        {"source": HUB_ID, "hub_split": "test"},
        {"source": HUB_ID, "text_field": "story"},
    ])
    assert train["texts"] == splits["train"]  # every row, in file order (empties are dropped later)
    assert val["texts"] == splits["validation"]
    assert bad_split["error"] == (
        f"cannot load hub dataset '{HUB_ID}' split 'test' (Unknown split \"test\". Should be one of "
        "['train', 'validation'].): check the id and --hub-split, or pass local files with --data PATH "
        "(.txt, .jsonl, .parquet or a directory)")
    assert bad_field["error"] == f"hub dataset '{HUB_ID}' has no column 'story' (columns: text): set --text-field"


UNREACHABLE = dict(HF_HUB_OFFLINE=None, HTTPS_PROXY="http://127.0.0.1:9", https_proxy=None, ALL_PROXY=None,
                   all_proxy=None)  # no offline flag, and the hub probe is refused at once (port 9)


def test_without_offline_mode_an_unreachable_hub_falls_back_to_the_hub_cache(hub_home):
    home, splits = hub_home
    cached, absent = _load(home, [{"source": HUB_ID}, {"source": "someone/no-such-stories"}], **UNREACHABLE)
    assert cached["texts"] == splits["train"]
    assert absent["error"] == ("cannot load hub dataset 'someone/no-such-stories' (no network?): pass local files "
                               "with --data PATH (.txt, .jsonl, .parquet or a directory)")


def test_offline_without_the_dataset_in_the_hub_cache_fails_in_one_line(tmp_path):
    (offline,) = _load(tmp_path, [{"source": HUB_ID}])
    assert offline["error"].startswith(f"cannot load hub dataset '{HUB_ID}' ")
    assert offline["error"].endswith("pass local files with --data PATH (.txt, .jsonl, .parquet or a directory)")


def test_cairn_prepare_with_no_data_option_prepares_the_hub_dataset(hub_home, tmp_path):
    # the main job's data step without --data: the default id, split train, field text
    home, splits = hub_home
    p = subprocess.run([sys.executable, "-m", "cairn", "prepare", "--preset", "tiny", "--train-frac", "0.8",
                        "--val-frac", "0.1", "--cache-dir", str(tmp_path / "cache"), "--json"],
                       env=_env(home), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    counts = {name: split["stories"] for name, split in report["splits"].items()}
    assert counts == {"train": 192, "val": 24, "test": 24}  # the 240 non-empty stories of the train split
    assert report["source"] == HUB_ID
