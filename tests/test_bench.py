import json

from cairn.bench import main


def test_bench_times_every_variant_and_checks_cached_decoding(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--d-model", "32", "--n-heads", "4", "--n-layers", "1", "--seq-len", "32", "--batch-size", "2",
                 "--vocab-size", "300", "--rounds", "2", "--generate", "12", "--variants", "nanogpt,cairn,tutorial",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["training"]}
    assert set(rows) == {"nanogpt", "cairn", "tutorial"}
    assert all(len(r["steps"]) == 2 and r["tokens_per_s"] > 0 for r in rows.values())
    # the tutorial pads every row to 1000 tokens: only its real story tokens are useful
    assert rows["tutorial"]["useful_tokens_per_s"] < rows["tutorial"]["tokens_per_s"]
    assert rows["cairn"]["useful_tokens_per_s"] == rows["cairn"]["tokens_per_s"]
    assert set(result["generation_tokens_per_s"]) == {"kv_cache", "recompute"}
    assert "generation of 12 tokens" in capsys.readouterr().out
