"""Multi-process training: 2 CPU processes (DDP over gloo) equal 1 process with grad accumulation 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dadpo.errors import DadpoError
from dadpo.recipes.dadpo import TrainConfig, train

from support import ENV, REPO, assert_same_steps, metrics, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_equal_one_process_with_grad_accum(models, cache_dir, tmp_path):
    common = ["--cache", cache_dir, "--model", models["student_b"], "--lr", "1e-3", "--batch-size", "2",
              "--max-steps", "3", "--warmup-steps", "1", "--seed", "3", "--eval-fraction", "0.1", "--save-every", "2"]
    one = tmp_path / "one"
    train_cli(*common, "--out", one, "--grad-accum", "2")

    # torchrun + ACCELERATE_USE_CPU=1 is how accelerate runs several CPU processes (gloo) without
    # mpirun; on GPUs `accelerate launch --num_processes N` starts the same thing.
    two = tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "dadpo.cli.main", "train", *map(str, common), "--out", str(two), "--grad-accum", "1", "--quiet"],
        cwd=REPO, env={**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 3 steps") == 1  # only the main process reports

    got, want = metrics(two), metrics(one)
    assert len(want) == 3
    assert_same_steps(got, want, keys=("loss", "margin", "reward_accuracy", "lr", "grad_norm"), tolerance=1e-5)
    assert metrics(two, "eval.jsonl")[0]["eval_loss"] == pytest.approx(metrics(one, "eval.jsonl")[0]["eval_loss"], abs=1e-5)
    # each process saved its own RNG state into the one checkpoint
    checkpoint = two / "checkpoints" / "step-000002"
    assert (checkpoint / "rng-rank00000.safetensors").is_file() and (checkpoint / "rng-rank00001.safetensors").is_file()
    assert not (one / "checkpoints" / "step-000002" / "rng-rank00001.safetensors").exists()


def test_unaware_processes_are_refused(models, cache_dir, tmp_path, monkeypatch):
    """torchrun on a CPU machine without ACCELERATE_USE_CPU: accelerate sees one process, so
    each copy would train alone into the same folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DadpoError, match="WORLD_SIZE=2 but accelerate sees 1 process.*ACCELERATE_USE_CPU=1"):
        train(TrainConfig(cache=str(cache_dir), out=str(tmp_path / "r"), model=str(models["student_b"]),
                          batch_size=2, grad_accum=1, max_steps=1, progress=False))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
