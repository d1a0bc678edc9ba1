"""Helpers shared by the training tests (tests/test_train_*.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, kill_when, run_cli, start_cli  # noqa: F401  (re-exported)

# One intra-op thread per process: on a loaded 2-core machine more threads only contend.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

_SHARED: dict[str, Path] = {}


def shared_cache(tmp_path_factory, models, pairs_file) -> Path:
    """One tiny cache (teacher = tiny Llama, reference = tiny Qwen3 student) for all training tests
    in the session. Tests read it and never change it."""
    if "cache" not in _SHARED:
        out = tmp_path_factory.mktemp("train-cache") / "cache"
        result = run_cli("cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"], "--reference",
                         models["student"], "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size",
                         "16", "--quiet", env=ENV)
        assert result.returncode == 0, result.stderr
        _SHARED["cache"] = out
    return _SHARED["cache"]


def train_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    result = run_cli("train", *args, "--quiet", env={**ENV, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run) / name).read_text().splitlines() if line.strip()]


def assert_same_steps(got: list[dict], want: list[dict], keys=("loss", "margin", "reward_accuracy", "lr"),
                      tolerance: float = 1e-6) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for a, b in zip(got, want):
        for key in keys:
            assert abs(a[key] - b[key]) <= tolerance * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


def sequence_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log p(response | prompt) from a plain full-vocabulary forward pass on one sequence."""
    ids = prompt_ids + response_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))


def single_thread():
    """For an autouse fixture: in-process training on one intra-op thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Fixtures the training test modules import (importing an autouse fixture turns it on there).
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, models, pairs_file):
    return shared_cache(tmp_path_factory, models, pairs_file)
