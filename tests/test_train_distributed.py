"""Multi-process training: 2 CPU processes (DDP, and FSDP2, over gloo) equal 1 process with grad
accumulation 2; FSDP checkpoints resume exactly, under FSDP and in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dadpo.errors import DadpoError
from dadpo.recipes.dadpo import TrainConfig, train

from support import ENV, REPO, assert_same_steps, free_port, metrics, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
# accelerate's FSDP2, selected the way an `accelerate launch` FSDP config does (its environment variables)
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen3DecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def common(cache_dir, models) -> list:
    return ["--cache", cache_dir, "--model", models["student_b"], "--lr", "1e-3", "--batch-size", "2",
            "--max-steps", STEPS, "--warmup-steps", "1", "--seed", "3", "--eval-fraction", "0.1", "--save-every", "2"]


def torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Two CPU processes over gloo: torchrun + ACCELERATE_USE_CPU=1 is how accelerate runs several CPU
    processes without mpirun; on GPUs `accelerate launch --num_processes N` starts the same thing."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "dadpo.cli.main", "train", *map(str, args), "--quiet"],
        cwd=REPO, env={**os.environ, **ENV, "ACCELERATE_USE_CPU": "1", **(env or {})}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one(models, cache_dir, tmp_path_factory):
    """The reference: one process, grad accumulation 2 (the same global batch of 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    train_cli(*common(cache_dir, models), "--out", out, "--grad-accum", "2")
    return out


def test_two_processes_equal_one_process_with_grad_accum(models, cache_dir, one, tmp_path):
    two = tmp_path / "two"
    result = torchrun(*common(cache_dir, models), "--out", two, "--grad-accum", "1")
    assert result.stdout.count(f"trained {STEPS} steps") == 1  # only the main process reports

    got, want = metrics(two), metrics(one)
    assert len(want) == STEPS
    assert_same_steps(got, want, keys=("loss", "margin", "reward_accuracy", "lr", "grad_norm"), tolerance=1e-5)
    assert metrics(two, "eval.jsonl")[0]["eval_loss"] == pytest.approx(metrics(one, "eval.jsonl")[0]["eval_loss"], abs=1e-5)
    # each process saved its own RNG state into the one checkpoint
    checkpoint = two / "checkpoints" / "step-000002"
    assert (checkpoint / "rng-rank00000.safetensors").is_file() and (checkpoint / "rng-rank00001.safetensors").is_file()
    assert not (one / "checkpoints" / "step-000002" / "rng-rank00001.safetensors").exists()


def test_fsdp_two_processes_equal_one_and_resume_exactly(models, cache_dir, one, tmp_path):
    fsdp = tmp_path / "fsdp"
    torchrun(*common(cache_dir, models), "--out", fsdp, "--grad-accum", "1", env=FSDP)
    assert json.loads((fsdp / "train_config.json").read_text())["distributed_type"] == "FSDP"
    keys = ("loss", "margin", "reward_accuracy", "lr", "grad_norm")
    assert_same_steps(metrics(fsdp), metrics(one), keys=keys, tolerance=1e-5)
    # the checkpoint holds full weights and a full optimizer state, keyed by parameter name
    checkpoint = fsdp / "checkpoints" / "step-000002"
    assert (checkpoint / "model" / "model.safetensors").is_file() and (checkpoint / "optimizer.safetensors").is_file()

    # interrupted after step 2: resumed under FSDP, and (the same checkpoint) in one process
    for name, resume in (("fsdp", lambda out: torchrun(*common(cache_dir, models), "--out", out, "--grad-accum", 1,
                                                       "--resume", env=FSDP)),
                         ("single", lambda out: train_cli(*common(cache_dir, models), "--out", out, "--grad-accum", 2,
                                                          "--resume"))):
        cut = tmp_path / f"cut-{name}"
        shutil.copytree(fsdp, cut)
        shutil.rmtree(cut / "checkpoints" / "step-000004")
        (cut / "summary.json").unlink()
        resume(cut)
        assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 2
        assert_same_steps(metrics(cut), metrics(one), keys=keys, tolerance=1e-5)


def test_unaware_processes_are_refused(models, cache_dir, tmp_path, monkeypatch):
    """torchrun on a CPU machine without ACCELERATE_USE_CPU: accelerate sees one process, so
    each copy would train alone into the same folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DadpoError, match="WORLD_SIZE=2 but accelerate sees 1 process.*ACCELERATE_USE_CPU=1"):
        train(TrainConfig(cache=str(cache_dir), out=str(tmp_path / "r"), model=str(models["student_b"]),
                          batch_size=2, grad_accum=1, max_steps=1, progress=False))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
