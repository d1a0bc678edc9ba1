"""Shared fixtures: tiny real models and pairs files, built once per test session.

teacher   Llama, byte-level BPE, ChatML template, no BOS
student   Qwen3, Metaspace BPE + byte fallback, zephyr-style template ending in a space, BOS
student_b same tokenizer as student, other weights: a policy start that differs from the reference
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Bad input: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
