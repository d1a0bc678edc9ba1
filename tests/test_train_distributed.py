"""Multi-process training: 2 CPU processes (DDP, and FSDP2, over gloo) equal 1 process with grad
accumulation 2; FSDP checkpoints resume exactly, under FSDP and in one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from dadpo.errors import DadpoError
from dadpo.recipes.dadpo import TrainConfig, train

from dadpo.training.checkpoint import list_checkpoints
from support import ENV, REPO, assert_same_steps, free_port, metrics, signal_when, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
# accelerate's FSDP2, selected the way an `accelerate launch` FSDP config does (its environment variables)
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen3DecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def common(cache_dir, models) -> list:
    return ["--cache", cache_dir, "--model", models["student_b"], "--lr", "1e-3", "--batch-size", "2",
            "--max-steps", STEPS, "--warmup-steps", "1", "--seed", "3", "--eval-fraction", "0.1", "--save-every", "2"]


def torchrun_command(*args) -> list[str]:
    """Two CPU processes over gloo: torchrun + ACCELERATE_USE_CPU=1 is how accelerate runs several CPU
    processes without mpirun; on GPUs `accelerate launch --num_processes N` starts the same thing.
    torchrun passes SIGTERM and SIGUSR1 on to every process (what a SLURM job is told before it ends)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "--signals-to-handle", "SIGTERM,SIGUSR1", "--shutdown-timeout", "120",
            "-m", "dadpo.cli.main", "train", *map(str, args), "--quiet"]


def torch_env(env: dict | None = None) -> dict:
    return {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1", **(env or {})}


def torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(*args), cwd=REPO, env=torch_env(env), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one(models, cache_dir, tmp_path_factory):
    """The reference: one process, grad accumulation 2 (the same global batch of 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    train_cli(*common(cache_dir, models), "--out", out, "--grad-accum", "2")
    return out


def test_two_processes_equal_one_process_with_grad_accum_and_survive_a_stop_signal(models, cache_dir, one, tmp_path):
    """Two DDP processes; SIGUSR1 to the launcher after step 2: every process finishes the step in
    flight, one checkpoint of it is written; --resume then logs what one process logs uninterrupted."""
    two = tmp_path / "two"
    launcher = subprocess.Popen(torchrun_command(*common(cache_dir, models), "--out", two, "--grad-accum", "1"),
                                cwd=REPO, env=torch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = two / "metrics.jsonl"
    assert signal_when(launcher, lambda: log.exists() and len(log.read_text().splitlines()) >= 2, signal.SIGUSR1)
    launcher.communicate(timeout=300)
    stopped_at = len(metrics(two))
    assert 2 <= stopped_at < STEPS and list_checkpoints(two)[-1].name == f"step-{stopped_at:06d}"
    assert not (two / "summary.json").exists()
    result = torchrun(*common(cache_dir, models), "--out", two, "--grad-accum", "1", "--resume")
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
        shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:06d}")
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
