"""Every failure is one line: each case runs the real command as a subprocess and checks what the
user sees (one line on stderr, no traceback, a non-zero exit) and that nothing was half-written."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from support import ENV, assert_one_line_error, metrics, run_cli, start_cli, write_jsonl

TRAIN = ["--batch-size", 2, "--grad-accum", 1, "--eval-fraction", 0, "--quiet"]
NO_CUDA = {**ENV, "CUDA_VISIBLE_DEVICES": ""}


def cache_args(pairs_file, models, out, *extra):
    return ["cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"], "--reference", models["student"],
            "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size", "16", "--quiet", *extra]


def generate_args(prompts, models, out, *extra):
    return ["generate", "--prompts", prompts, "--teacher", models["teacher"], "--student", models["student"],
            "--out", out, "--max-new-tokens", 4, "--quiet", *extra]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Hi"}, {"id": "b", "prompt": "Why?"}])


@pytest.fixture(scope="module")
def checkpointed_run(cache_dir, models, tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint after each step."""
    run = tmp_path_factory.mktemp("resume") / "run"
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", run, "--max-steps", 3,
                     "--save-every", 1, *TRAIN, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


# ---------------------------------------------------------------- --resume and a torn log


def test_resume_drops_a_torn_last_log_line(checkpointed_run, cache_dir, models, tmp_path):
    """Killed while appending step 3's line, after step 2's checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:len(lines[2]) // 2])
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", run, "--max-steps", 3,
                     "--save-every", 1, "--resume", *TRAIN, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


def test_resume_names_a_bad_line_before_changing_anything(checkpointed_run, cache_dir, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    listing = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", run, "--max-steps", 3,
                     "--save-every", 1, "--resume", *TRAIN, env=ENV)
    assert_one_line_error(result, f"{run / 'metrics.jsonl'} line 2", "not a step record")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == listing  # summary.json, model/ kept


# ---------------------------------------------------------------- the CLI's last resort


def test_an_unexpected_failure_is_one_line_and_the_traceback_is_one_variable_away(cache_dir, models, tmp_path):
    """--out under a file: the OS error names the path, exit 1; DADPO_TRACEBACK=1 adds the traceback."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    args = ["train", "--cache", cache_dir, "--model", models["student_b"], "--out", blocker / "run", "--max-steps", 1,
            *TRAIN]
    result = run_cli(*args, env=ENV)
    line = assert_one_line_error(result, str(blocker))
    assert result.returncode == 1 and line.startswith("error: "), line
    traced = run_cli(*args, env={**ENV, "DADPO_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr
    assert traced.stderr.strip().splitlines()[-1] == line
    assert blocker.read_text() == "a file"


# ---------------------------------------------------------------- flags checked up front


@pytest.mark.parametrize("device, why", [("gpu", "unknown device"), ("cuda", "this machine has no CUDA device"),
                                         ("cuda:x", "unknown device")])
def test_device_is_checked_up_front(device, why, pairs_file, cache_dir, models, prompts, tmp_path):
    cases = [(cache_args(pairs_file, models, tmp_path / "cache", "--device", device), tmp_path / "cache"),
             (generate_args(prompts, models, tmp_path / "pairs.jsonl", "--backend", "hf", "--device", device),
              tmp_path / "pairs.jsonl"),
             (["verify-cache", "--cache", cache_dir, "--device", device], None)]
    for args, out in cases:
        result = run_cli(*args, env=NO_CUDA)  # no CUDA for this process, whatever the machine has
        assert_one_line_error(result, f"--device {device}: {why}")
        assert out is None or not out.exists(), args[0]


@pytest.mark.parametrize("date", ["20240101", "2024-W01-1", "2024-1-1"])
def test_template_date_must_be_year_month_day(date, pairs_file, models, tmp_path):
    result = run_cli(*cache_args(pairs_file, models, tmp_path / "cache", "--template-date", date), env=ENV)
    assert_one_line_error(result, f"--template-date {date}: expected a date as YYYY-MM-DD")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- outputs and sidecars


def test_report_out_that_cannot_be_written(checkpointed_run, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    result = run_cli("report", checkpointed_run, "--out", blocker / "curves.png", env=ENV)
    assert_one_line_error(result, f"--out {blocker / 'curves.png'}: cannot write")
    assert blocker.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_corrupt_generate_sidecar(prompts, models, tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text('{"id": "a"}\n')
    (tmp_path / "pairs.jsonl.generate.json").write_text('{"format_version": 2, "rows"')
    for extra in ([], ["--overwrite"]):
        result = run_cli(*generate_args(prompts, models, out, "--backend", "hf", *extra), env=ENV)
        assert_one_line_error(result, "pairs.jsonl.generate.json: unreadable dadpo generate sidecar")
        assert out.read_text() == '{"id": "a"}\n' and not (tmp_path / "pairs.jsonl.work").exists()


# ---------------------------------------------------------------- --reuse-from opens the old cache verified


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_reuse_from_a_damaged_cache(damage, cache_dir, pairs_file, models, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    shard = sorted((old / "shards").glob("*.parquet"))[1]
    if damage == "missing":
        shard.unlink()
    else:  # same size, other bytes: only the checksum can tell
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    result = run_cli(*cache_args(pairs_file, models, tmp_path / "new", "--reuse-from", old), env=ENV)
    why = "checksum does not match the manifest" if damage == "altered" else "shard listed in the manifest is missing"
    assert_one_line_error(result, f"--reuse-from {old}", str(shard), why)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- vLLM engines


@pytest.mark.vllm
def test_a_bad_vllm_arg_key(vllm_ready, prompts, models, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run_cli(*generate_args(prompts, models, out, "--backend", "vllm", "--vllm-arg", "no_such_knob=1",
                                    "--vllm-arg", "enforce_eager=true"), env=ENV)
    line = assert_one_line_error(result, "--vllm-arg: no_such_knob: not an argument of vllm.LLM")
    assert "enforce_eager" not in line
    assert not out.exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.vllm
def test_a_dead_engine_process_is_one_line(vllm_ready, prompts, models, tmp_path):
    """The pass's process is killed (as the OOM killer would): one line naming the pass, exit non-zero."""
    out = tmp_path / "pairs.jsonl"
    process = start_cli(*generate_args(prompts, models, out, "--backend", "vllm"), env=ENV)
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        for child in _children(process.pid):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:  # the isolated pass (not the resource tracker)
                victim = child
        time.sleep(0.05)
    assert victim is not None, "the pass process never started"
    time.sleep(2)
    os.kill(victim, 9)
    _, stderr = process.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert "the teacher pass" in lines[0] and "killed by signal 9" in lines[0], lines[0]
    assert not out.exists()
