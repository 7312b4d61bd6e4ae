"""Experiment trackers: a tiny run logs to the real wandb (offline), MLflow (file store), Trackio
(SQLite) and CSV clients, each read back with its own reader and compared with metrics.jsonl; a
resumed run continues the same tracker runs; a failing tracker costs one warning."""

import contextlib
import io
import json
import logging
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_stories, write_stories

from cairn.config.io import apply_overrides, from_dict, load_toml
from cairn.config.sections import RunConfig, validate
from cairn.trackers.base import TAGS, TrackedRun, scalars
from cairn.trackers.csv_tracker import CsvTracker
from cairn.trackers.fanout import STATE_FILE, Trackers, read_state
from cairn.util.errors import CairnError

TRACKER_ENV = ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI",
               "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "TRACKIO_DIR", "TRACKIO_SPACE_ID",
               "TRACKIO_SERVER_URL")
ARGS = ["--preset", "tiny", "--d-model", "32", "--n-heads", "4", "--d-mlp", "64", "--seq-len", "32",
        "--batch-size", "4", "--report-every", "2", "--eval-every", "4", "--eval-batches", "1", "--end-stories", "0",
        "--checkpoint-every", "0", "--no-progress"]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING and r.name.startswith("cairn")]


@contextlib.contextmanager
def collected():
    logger, handler = logging.getLogger("cairn"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cairn_train(*args: str) -> str:
    from cairn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *args])
    assert code == 0, out.getvalue()
    return out.getvalue()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]


def last_per_step(pairs: list[tuple[int, float]]) -> dict[int, float]:
    return dict(pairs)  # a later value of a step wins, as it does in a tracker keyed by step


# ---------------------------------------------------------------- wandb's offline files, read back

def wandb_records(path: Path):
    """The records of a wandb transaction log (`run-*.wandb`): LevelDB-log framing of protobuf Records.
    wandb 0.31 ships no reader in Python (its core is Go), so the framing is read here: a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, header, pos, parts = 32768, 7, 7, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # too little of the block left for a chunk header: padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and n == 0:
            break
        chunk = data[pos + header:pos + header + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += header + n
        parts += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


@dataclass
class WandbRead:
    run_ids: list[str]  # one per file: each process that logged the run
    history: list[dict]  # every history row, in order, across files
    config: dict


def read_wandb(run: Path) -> WandbRead:
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    ids, history, config = [], [], {}
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "config":
                config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.config.update})
    return WandbRead(ids, history, config)


# ---------------------------------------------------------------- one run, stopped and resumed

@dataclass
class TrackedRunDirs:
    run: Path
    cwd: Path
    first_state: dict
    first_output: str
    resumed_output: str
    warnings: list[str]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, small_tokenizer) -> TrackedRunDirs:
    """`cairn train --tracker wandb,mlflow,trackio,csv` stopped after step 4 and resumed to step 8,
    offline, with no tracker location in the environment (so each must stay inside the run)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    base = tmp_path_factory.mktemp("trackers")
    data = write_stories(base / "stories.jsonl", make_stories(120))
    run, cwd = base / "run", base / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp, collected() as logs:
        for name in TRACKER_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.chdir(cwd)
        first = cairn_train(*ARGS, "--data", str(data), "--tokenizer", str(small_tokenizer), "--out", str(run),
                            "--max-steps", "8", "--stop-after", "4", "--tracker", "wandb,mlflow,trackio,csv")
        state = json.loads((run / STATE_FILE).read_text())
        resumed = cairn_train("--resume", str(run), "--no-progress")
    return TrackedRunDirs(run, cwd, state, first, resumed, logs.warnings())


@pytest.mark.slow
def test_the_run_and_its_resume_log_without_warnings_and_nothing_outside_the_run(tracked):
    assert tracked.warnings == []
    assert list(tracked.cwd.iterdir()) == []
    for name in ("wandb", "mlflow", "trackio"):
        assert f"{name}: run" in tracked.first_output and " started " in tracked.first_output
        assert any(line.startswith(f"{name}: run") and " continued " in line
                   for line in tracked.resumed_output.splitlines()), name
    assert (tracked.run / "mlruns").is_dir() and (tracked.run / "trackio" / "cairn.db").is_file()
    records = metrics(tracked.run)
    assert [s for s, _ in series(records, "train", "train_loss")] == [2, 4, 6, 8]
    assert [s for s, _ in series(records, "test", "test_loss")] == [8]


@pytest.mark.slow
def test_wandb_holds_the_same_losses_in_one_continued_run(tracked):
    records = metrics(tracked.run)
    w = read_wandb(tracked.run)
    run_id = tracked.first_state["wandb"]["id"]
    assert w.run_ids == [run_id, run_id]  # the resumed process logged into the same run
    assert json.loads((tracked.run / STATE_FILE).read_text())["wandb"]["id"] == run_id
    steps = [row["_step"] for row in w.history]
    assert steps == sorted(set(steps))  # no step logged twice, across both processes
    for kind, key in (("train", "train_loss"), ("val", "val_loss"), ("test", "test_loss"), ("train", "lr")):
        tag = TAGS[kind][key]
        got = {row["_step"]: row[tag] for row in w.history if tag in row}
        assert got == last_per_step(series(records, kind, key)), tag
    # the config, the precision and the plan
    run_json = json.loads((tracked.run / "run.json").read_text())
    assert w.config["model"]["d_model"] == 32
    assert w.config["run"]["precision"] == run_json["precision"]
    assert w.config["run"]["plan"]["total_steps"] == run_json["plan"]["total_steps"] == 8


@pytest.mark.slow
def test_mlflow_holds_the_same_losses_in_one_continued_run(tracked):
    from mlflow.tracking import MlflowClient

    records = metrics(tracked.run)
    state = json.loads((tracked.run / STATE_FILE).read_text())["mlflow"]
    assert state == tracked.first_state["mlflow"]  # the same run, continued
    assert state["tracking_uri"] == (tracked.run / "mlruns").resolve().as_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=state["tracking_uri"])
        for kind, key in (("train", "train_loss"), ("val", "val_loss"), ("test", "test_loss")):
            got = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], TAGS[kind][key])]
            assert sorted(got) == sorted(series(records, kind, key)), key  # every record, none twice
        r = client.get_run(state["run_id"])
        assert len(client.search_runs([r.info.experiment_id])) == 1
    run_json = json.loads((tracked.run / "run.json").read_text())
    assert r.info.status == "FINISHED"
    assert r.data.params["run.precision"] == run_json["precision"]
    assert r.data.params["run.plan.total_steps"] == "8"
    assert r.data.params["model.d_model"] == "32"


@pytest.mark.slow
def test_trackio_holds_the_same_losses_in_one_continued_run(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    records = metrics(tracked.run)
    state = json.loads((tracked.run / STATE_FILE).read_text())["trackio"]
    assert state == tracked.first_state["trackio"]
    # the database cairn pointed Trackio at, inside the run
    assert SQLiteStorage.get_project_db_path("cairn") == (tracked.run / "trackio" / "cairn.db").resolve()
    rows = SQLiteStorage.get_logs("cairn", state["name"])
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    for kind, key in (("train", "train_loss"), ("val", "val_loss"), ("test", "test_loss")):
        tag = TAGS[kind][key]
        assert [(r["step"], r[tag]) for r in rows if tag in r] == series(records, kind, key), tag
    config = SQLiteStorage.get_run_config("cairn", state["name"])
    assert config["run"]["plan"]["total_steps"] == 8 and config["model"]["d_model"] == 32


@pytest.mark.slow
def test_csv_holds_every_record_of_metrics_jsonl(tracked):
    import csv

    records = metrics(tracked.run)
    with open(tracked.run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], int(r["step"])) for r in rows] == [(r["kind"], r["step"]) for r in records]
    for row, record in zip(rows, records):
        for key, value in record.items():
            if isinstance(value, float):
                assert float(row[key]) == value, key  # written as Python prints it: the same float back
            elif value is None:
                assert row[key] == ""


# ---------------------------------------------------------------- failures

@pytest.mark.slow
def test_failing_trackers_cost_one_warning_each_and_the_run_completes(tmp_path, small_tokenizer, monkeypatch):
    """wandb not installed, MLflow's store unusable, and the CSV file failing mid-run (a full disk)."""
    data = write_stories(tmp_path / "stories.jsonl", make_stories(80))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it fails
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where MLflow wants its store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", blocked.as_uri() + "/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    writes = []
    real_log = CsvTracker.log

    def disk_full_after_two(self, record):
        writes.append(record["step"])
        if len(writes) > 2:
            raise OSError(28, "No space left on device")
        real_log(self, record)

    monkeypatch.setattr(CsvTracker, "log", disk_full_after_two)
    run = tmp_path / "run"
    with collected() as logs:
        cairn_train(*ARGS, "--data", str(data), "--tokenizer", str(small_tokenizer), "--out", str(run),
                    "--max-steps", "6", "--tracker", "wandb,mlflow,csv")
    warnings = logs.warnings()
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("tracker wandb did not start (the wandb tracker needs the wandb client: "
                                  "pip install 'cairn-lm[wandb]')")
    assert warnings[1].startswith("tracker mlflow did not start (")
    assert warnings[2] == ("tracker csv failed ([Errno 28] No space left on device): "
                           "training goes on without it")
    assert all("\n" not in w for w in warnings)
    assert len(writes) == 3  # dropped after it failed
    records = metrics(run)
    assert [r["step"] for r in records if r["kind"] == "test"] == [6]  # the run completed
    assert (run / "checkpoints").is_dir()


def test_trackers_fan_out_and_drop_a_failing_one_after_one_warning(tmp_path, caplog):
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def start(self, run: TrackedRun) -> dict:
            return {"id": "abc"}

        def log(self, record: dict) -> None:
            self.calls += 1
            raise ConnectionError("server unreachable\nretry later")

        def finish(self, ok: bool) -> None:
            raise RuntimeError("already broken")

    failing = Failing()
    run = TrackedRun(tmp_path, "t", {}, {}, 0)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        trackers = Trackers.open(["csv", "broken"], run, {"csv": CsvTracker, "broken": lambda: failing})
        for step in (1, 2, 3):
            trackers.log({"kind": "train", "step": step, "train_loss": 1.0 / step})
        trackers.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "tracker broken failed (server unreachable retry later): training goes on without it"]
    assert failing.calls == 1
    assert read_state(tmp_path) == {"broken": {"id": "abc"}}
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["train,1,,1.0", "train,2,,0.5",
                                                                       "train,3,,0.3333333333333333"]


# ---------------------------------------------------------------- pieces

def test_csv_widens_its_header_and_drops_what_a_resumed_run_redoes(tmp_path):
    t = CsvTracker()
    t.start(TrackedRun(tmp_path, "t", {}, {}, 0))
    t.log({"kind": "train", "step": 2, "epoch": 1, "train_loss": 3.5})
    t.log({"kind": "val", "step": 2, "epoch": 1, "val_loss": 3.25, "full": False})
    t.log({"kind": "train", "step": 4, "epoch": 1, "train_loss": 3.0, "mfu": None})
    t.log({"kind": "test", "step": 4, "epoch": 1, "test_loss": 2.75})
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "kind,step,epoch,train_loss,val_loss,full,mfu,test_loss",
        "train,2,1,3.5,,,,", "val,2,1,,3.25,false,,", "train,4,1,3.0,,,,", "test,4,1,,,,,2.75"]
    resumed = CsvTracker()
    resumed.start(TrackedRun(tmp_path, "t", {}, {}, 2))  # from the checkpoint at step 2
    resumed.log({"kind": "train", "step": 4, "epoch": 1, "train_loss": 2.5})
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "kind,step,epoch,train_loss,val_loss,full,mfu,test_loss",
        "train,2,1,3.5,,,,", "val,2,1,,3.25,false,,", "train,4,1,2.5,,,,"]


def test_scalars_name_each_kind_of_record():
    assert scalars({"kind": "val", "step": 3, "val_loss": 2.0, "val_tokens": 10, "full": True}) == {"val/loss": 2.0}
    assert scalars({"kind": "end_on_best", "step": 3, "best_step": 2}) == {}


def test_trackers_config_option_and_old_tensorboard_switch(tmp_path):
    cfg = apply_overrides(RunConfig(), {"trackers": "wandb, csv,wandb"})
    assert cfg.report.trackers == ("wandb", "csv")
    cfg.report.tensorboard = True
    assert cfg.report.tracker_names() == ["wandb", "csv", "tensorboard"]
    assert from_dict(cfg.to_dict()) == cfg
    (tmp_path / "new.toml").write_text('[report]\ntrackers = ["mlflow", "trackio"]\n')
    assert load_toml(tmp_path / "new.toml").report.tracker_names() == ["mlflow", "trackio"]
    # a config written before trackers existed: its tensorboard switch still turns TensorBoard on
    (tmp_path / "old.toml").write_text("[train]\ntensorboard = true\nreport_every = 3\n")
    assert load_toml(tmp_path / "old.toml").report.tracker_names() == ["tensorboard"]
    with pytest.raises(CairnError, match=r"^report.trackers: unknown tracker 'neptune': set report.trackers to any "
                                         r"of tensorboard, wandb, mlflow, trackio, csv"):
        validate(apply_overrides(RunConfig(), {"trackers": "csv,neptune"}))
    with pytest.raises(CairnError, match=r"^trackers must be a list of names, got 3"):
        apply_overrides(RunConfig(), {"trackers": 3})


def test_an_unknown_tracker_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from cairn.cli import main

    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--tracker", "csv,comet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "unknown tracker 'comet'" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_state_file_or_a_bad_one_means_new_runs(tmp_path, caplog):
    assert read_state(tmp_path) == {}
    (tmp_path / STATE_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="cairn"):
        assert read_state(tmp_path) == {}
    assert len(caplog.records) == 1 and "trackers open new runs" in caplog.records[0].getMessage()
    assert os.listdir(tmp_path) == [STATE_FILE]
