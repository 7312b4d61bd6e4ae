"""The stage tables of docs/experiments.md, written from the record
benchmarks/records/ablation-cpu-10min.json.

    python benchmarks/scripts/ablation_tables.py

Each stage gets the command that reruns it on today's code (`benchmarks/scripts/ablate.py`, with the stage's
base given as flags over today's `cpu-10min` preset) and a table of its recorded results. The docs
hold this output verbatim; tests/test_docs.py checks that they still do.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RECORD = Path(__file__).resolve().parents[1] / "records" / "ablation-cpu-10min.json"

# What stages 1-13 had that the preset no longer has: eager steps, no story mask, whole-split
# validation at every epoch end.
_OLD = "--compile false --story-mask false --epoch-val full"
_D192 = f"{_OLD} --d-model 192 --n-layers 4 --n-heads 3 --d-mlp 512 --batch-size 8 --lr 1.5e-3 --beta2 0.95 " \
        "--embed-lr-scale 1"
_D128_L4 = f"{_OLD} --n-layers 4 --lr 1.5e-3 --beta2 0.95"

# stage: (title, the base as flags over today's preset, (stage, variant) each row is compared with)
STAGES = {
    1: ("the first guess, and GPT-2's vocabulary",
        f"{_OLD} --d-model 256 --n-layers 4 --n-heads 4 --d-mlp 704 --tie-embeddings true --batch-size 8 "
        "--lr 3e-3 --beta2 0.95 --embed-lr-scale 1", (1, "base (first run)")),
    3: ("around the two winners of stage 2", None, (3, "lr 1.5e-3")),
    4: ("10-minute runs: tied or untied head", _D192, (4, "d192, lr 1.5e-3, tied (10 min)")),
    5: ("one change against d192 / 4 layers, batch 8", _D192, (6, "base (rerun, undisturbed)")),
    6: ("on top of batch 4", _D192, (5, "batch 4")),
    8: ("around d128 / 4 layers, batch 4, embedding lr x5", _D192, (8, "b4 d128 emb5")),
    9: ("one change against d128 / 4 layers, embedding lr x10 (scored story by story from here on)",
        _D128_L4, (9, "base")),
    10: ("the model's shape", _D128_L4, (9, "base")),
    11: ("AdamW's beta2", _D128_L4, (11, "base (rerun)")),
    13: ("3 layers and beta2 0.999: batch 2, the learning rate", f"{_OLD} --lr 1.5e-3",
         (13, "base (the new preset), rerun")),
    14: ("torch.compile and lr 2.5e-3: small changes", "--story-mask false --epoch-val full",
         (14, "base (the preset)")),
    15: ("the story mask", "--story-mask false --epoch-val full", (15, "base (the preset; plan grows too)")),
}
STAGES[2] = ("one change against the first guess", STAGES[1][1], (2, "base"))
STAGES[3] = (STAGES[3][0], STAGES[1][1], STAGES[3][2])


def _score(r: dict) -> float | None:
    return r.get("val_bits_per_byte")


def tables(result: dict) -> str:
    """The tables of the record's result (its "results" rows, each with its stage)."""
    rows = result["results"]
    by_key = {(r["stage"], r["variant"]): r for r in rows}
    out = []
    for stage in sorted({r["stage"] for r in rows}):
        title, base, ref_key = STAGES[stage]
        mine = [r for r in rows if r["stage"] == stage]
        budget = mine[0]["budget"]
        ref = _score(by_key[ref_key])
        ref_name = ref_key[1] if ref_key[0] == stage else f"{ref_key[1]} (stage {ref_key[0]})"
        out.append(f"### Stage {stage}: {title} ({budget} each)\n")
        variants = " ".join(f'--variant "{r["variant"]}: {r["flags"]}"' if r["flags"] else f'--variant "{r["variant"]}"'
                            for r in mine)
        out.append("```bash\npython benchmarks/scripts/ablate.py --data ../shared/data/tinystories "
                   f"--budget {budget} \\\n    --flags \"{base}\" \\\n    {variants}\n```\n")
        out.append(f"| variant | flags | val bits/byte | vs {ref_name} | steps | tokens/s |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for r in mine:
            flags = f"`{r['flags']}`" if r["flags"] else ""
            if "failed" in r:
                out.append(f"| {r['variant']} | {flags} | {r['failed']} | | | |")
                continue
            note = r.get("void") or r.get("note", "")
            void = bool(re.search(r"\bdisturbed\b", f"{note} {r['variant']}"))
            score = f"({_score(r):.3f}) void: {note or 'disturbed'}" if void else f"{_score(r):.3f}"
            delta = "" if void or r is by_key[ref_key] else f"{_score(r) - ref:+.3f}"
            speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ("" if void else note)
            out.append(f"| {r['variant']} | {flags} | {score} | {delta} | {r['steps_done']:,} | {speed} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    print(tables(json.loads(RECORD.read_text(encoding="utf-8"))["result"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
