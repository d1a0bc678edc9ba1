"""cache-teacher survives kill -9 and stop signals and resumes to exactly the uninterrupted result;
a re-run adopts shards written just before a crash, recomputes altered ones, and clears dead temp
files; --num-workers N --worker-index I processes fill one folder, equal to a one-worker run, a
second process with the same --worker-index is refused (a dead one's claim is not), and training
refuses the folder until every worker's shards are there."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from dadpo.atomic import temp_path
from dadpo.cache import CacheTeacherConfig, cache_teacher, open_cache
from dadpo.errors import DadpoError
from dadpo.stop import EXIT_STOPPED
from dadpo.tiny import make_tiny_pairs
from support import (assert_one_line_error, assert_same_cache, cache_args, kill_when, leftovers, run_cli,
                     signal_when, start_cli, write_jsonl)

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture(scope="module")
def pairs24(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs24") / "pairs.jsonl", make_tiny_pairs(24, seed=0))


@pytest.fixture(scope="module")
def clean(models, pairs24, tmp_path_factory):
    """The reference result: one uninterrupted run (6 shards of 4 pairs)."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    result = run_cli(*cache_args(pairs24, models, out))
    assert result.returncode == 0, result.stderr
    assert "24 pairs cached" in result.stdout and "complete" in result.stdout
    return out


def _any(folder):
    return lambda: folder.is_dir() and any(folder.glob("*.parquet"))


def test_kill_9_at_several_points_then_resume_equals_clean_run(models, pairs24, clean, tmp_path):
    out = tmp_path / "cache"
    args = cache_args(pairs24, models, out, "--quiet")
    kill_points = {
        "first teacher part written": _any(out / "work" / "teacher"),
        "mid reference pass": _any(out / "work" / "ref"),
        "first final shard written": _any(out / "shards"),
    }
    killed = {}
    for point, ready in kill_points.items():
        killed[point] = kill_when(start_cli(*args), ready)
        manifest = json.loads((out / "manifest.json").read_text())
        if killed[point]:
            assert not manifest["complete"]
            # A killed cache is never taken for a finished one.
            with pytest.raises(DadpoError, match=r"incomplete cache, \d+ of 6 shards missing"):
                open_cache(out)
    # The two points inside the scoring passes take seconds to pass: those kills must land.
    assert killed["first teacher part written"] and killed["mid reference pass"], killed

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "24 pairs cached" in result.stdout and "complete" in result.stdout
    assert_same_cache(out, clean)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_finishes_the_shard_in_flight_and_exits_75(models, pairs24, clean, tmp_path, signal_number):
    out = tmp_path / "cache"
    args = cache_args(pairs24, models, out, "--quiet")
    process = start_cli(*args)
    assert signal_when(process, _any(out / "work" / "teacher"), signal_number)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIG" in lines[0] and "re-run the same command" in lines[0], stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert not list(out.rglob("*.tmp"))  # the shard in flight was finished (or abandoned), never half-written
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert_same_cache(out, clean)


def _library_config(pairs, models, out, **extra) -> CacheTeacherConfig:
    return CacheTeacherConfig(pairs=str(pairs), teacher=[str(models["teacher"])], reference=str(models["student"]),
                              out=str(out), backend="hf", shard_size=4, progress=False, **extra)


def _dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_rerun_adopts_unrecorded_shards_recomputes_bad_ones_and_clears_temp_files(models, pairs24, clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = out / "shards"
    # Crash between a shard's rename and its manifest entry: the file is there, unrecorded.
    # Shard 5 is the real file (adopt it); "shard 1" holds shard 0's rows (must not be adopted).
    shutil.copy(shards / "shard-00000-of-00006.parquet", shards / "shard-00001-of-00006.parquet")
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in (1, 5)]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    # A recorded shard altered on disk: recomputed.
    altered = shards / "shard-00002-of-00006.parquet"
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    # Temporary files of killed writers, and of a writer on another node.
    dead = temp_path(shards / "shard-00003-of-00006.parquet").name.rsplit(".", 2)[0] + f".{_dead_pid()}.tmp"
    (shards / dead).write_bytes(b"half a parquet file")
    (shards / ".shard-00004-of-00006.parquet.othernode.12345.tmp").write_bytes(b"partial")

    untouched = {k: (shards / f"shard-0000{k}-of-00006.parquet").stat().st_mtime_ns for k in (0, 3, 4, 5)}

    summary = cache_teacher(_library_config(pairs24, models, out))
    assert summary.complete and summary.adopted == 1 and summary.repaired == 1
    # Only shards 1 and 2 were scored again; the others' files were not even rewritten.
    assert set(summary.pass_stats) == {"teacher", "reference"}
    assert {k: (shards / f"shard-0000{k}-of-00006.parquet").stat().st_mtime_ns for k in untouched} == untouched
    assert_same_cache(out, clean)


def test_rerun_of_a_complete_cache_scores_nothing(models, pairs24, clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    summary = cache_teacher(_library_config(pairs24, models, out))
    assert summary.complete and summary.pass_stats == {} and summary.adopted == 0 and summary.repaired == 0
    assert_same_cache(out, clean)
    assert leftovers(out) == []


# ---- several workers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers_at_once(models, pairs24, tmp_path_factory):
    """Both workers started together: they share the manifest under its lock."""
    out = tmp_path_factory.mktemp("two") / "cache"
    workers = [start_cli(*cache_args(pairs24, models, out, "--quiet", "--num-workers", 2, "--worker-index", i))
               for i in (0, 1)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    return out, [stdout for stdout, _ in outputs]


def test_concurrent_workers_equal_clean(two_workers_at_once, clean):
    out, stdouts = two_workers_at_once
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == list(range(6))  # no shard lost to a race
    assert_same_cache(out, clean)
    # Whoever recorded the last shard says complete; the other saw the others' shards missing.
    assert any(", complete (" in s for s in stdouts)


def test_train_refuses_until_all_workers_are_done(models, pairs24, clean, tmp_path):
    out = tmp_path / "cache"
    first = run_cli(*cache_args(pairs24, models, out, "--quiet", "--num-workers", 2, "--worker-index", 0))
    assert first.returncode == 0, first.stderr
    assert "3 of 6 shards done" in first.stdout and "still missing" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 2, 4] and not manifest["complete"]

    refused = run_cli("train", "--cache", out, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(refused, "--cache", "incomplete cache", "3 of 6 shards missing", "shard 1, 3, 5")
    assert not (tmp_path / "run").exists()


def test_train_from_the_workers_cache_and_no_pickle_anywhere(two_workers_at_once, tmp_path):
    """Nothing dadpo writes (cache, run folder, checkpoint) is a pickle."""
    out, _ = two_workers_at_once
    assert run_cli("verify-cache", out).returncode == 0
    run = tmp_path / "run"
    result = run_cli("train", "--cache", out, "--out", run, "--batch-size", 4, "--grad-accum", 1,
                     "--max-steps", 1, "--eval-fraction", 0, "--quiet")
    assert result.returncode == 0, result.stderr
    written = [p for folder in (out, run) for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    for path in written:
        assert path.suffix not in (".pkl", ".pickle", ".pt", ".pth", ".bin"), path
        head = path.read_bytes()[:2]
        assert head not in PICKLE_MAGIC, path
        if head == b"PK":  # torch.save writes a zip holding data.pkl
            assert b"data.pkl" not in path.read_bytes(), path


def test_a_second_process_with_the_same_worker_index_is_refused(models, pairs24, tmp_path):
    out = tmp_path / "cache"
    first = start_cli(*cache_args(pairs24, models, out, "--quiet", "--num-workers", 2, "--worker-index", 0))
    claim = out / ".claims" / "worker-0-of-2.json"
    try:
        assert signal_when(first, claim.exists, signal_number=0)  # signal 0: only wait for the claim
        second = run_cli(*cache_args(pairs24, models, out, "--quiet", "--num-workers", 2, "--worker-index", 0))
        assert_one_line_error(second, "--worker-index 0", "already running", f"host {socket.gethostname()}",
                              f"pid {first.pid}")
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 2, 4]  # the first worker's shards, once each


def test_a_dead_process_claim_does_not_block_a_rerun(models, pairs24, clean, tmp_path):
    out = tmp_path / "cache"
    (out / ".claims").mkdir(parents=True)
    (out / ".claims" / "worker-0-of-1.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00"}))
    summary = cache_teacher(_library_config(pairs24, models, out))
    assert summary.complete
    assert_same_cache(out, clean)
