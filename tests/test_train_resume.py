"""Checkpoints and --resume: a run killed mid-way and resumed logs the same steps as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dadpo.training.checkpoint import list_checkpoints
from dadpo.errors import DadpoError
from dadpo.recipes.dadpo import TrainConfig, train

from support import (ENV, assert_one_line_error, assert_same_steps, kill_when, metrics, run_cli, start_cli,
                     stop_line_after_steps)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8


def run_args(cache_dir, models, out):
    # warmup + linear decay + weight decay: the scheduler and optimizer states both matter
    return ["train", "--cache", cache_dir, "--model", models["student_b"], "--out", out, "--lr", "1e-3",
            "--batch-size", "2", "--grad-accum", "2", "--max-steps", STEPS, "--warmup-steps", "2",
            "--weight-decay", "0.1", "--seed", "5", "--save-every", "2", "--eval-fraction", "0.1", "--quiet"]


def run_config(cache_dir, models, out, **changes) -> TrainConfig:
    """run_args as a TrainConfig, for in-process runs."""
    settings = dict(cache=str(cache_dir), model=str(models["student_b"]), out=str(out), lr=1e-3, batch_size=2,
                    grad_accum=2, max_steps=STEPS, warmup_steps=2, weight_decay=0.1, seed=5, save_every=2,
                    eval_fraction=0.1, progress=False)
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    train(run_config(cache_dir, models, out))
    return out


def test_killed_run_resumes_to_the_same_losses(cache_dir, models, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = start_cli(*run_args(cache_dir, models, out), env=ENV)
    assert kill_when(process, lambda: (out / "checkpoints" / "step-000002" / "trainer_state.json").exists())
    assert len(metrics(out)) >= 2
    # Continue from step 2 whatever the kill caught: later checkpoints (if any were written) go,
    # so steps 3.. logged before the kill must be dropped from metrics.jsonl, not duplicated.
    for later in list_checkpoints(out)[1:]:
        shutil.rmtree(later)
    (out / "summary.json").unlink(missing_ok=True)

    summary = train(run_config(cache_dir, models, out, resume=True))
    assert summary["resumed_from_step"] == 2 and json.loads((out / "summary.json").read_text())["steps"] == STEPS

    resumed, whole = metrics(out), metrics(uninterrupted)
    assert [s["step"] for s in resumed] == list(range(1, STEPS + 1))  # no step twice
    assert_same_steps(resumed, whole, keys=("loss", "margin", "reward_accuracy", "lr", "grad_norm"), tolerance=1e-6)
    assert json.loads((out / "eval.json").read_text())["eval_loss"] == pytest.approx(
        json.loads((uninterrupted / "eval.json").read_text())["eval_loss"], abs=1e-6)
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(uninterrupted / "model").state_dict()
    assert all(torch.allclose(final[k], reference[k], atol=1e-6) for k in reference)


def test_checkpoint_holds_no_pickle(uninterrupted):
    checkpoint = uninterrupted / "checkpoints" / "step-000004"
    names = {p.name for p in checkpoint.rglob("*") if p.is_file()}
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json",
            "rng-rank00000.safetensors", "rng-rank00000.json", "model.safetensors"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    state = load_file(checkpoint / "optimizer.safetensors")
    assert any(name.endswith("::exp_avg_sq") for name in state)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 4
    assert json.loads((checkpoint / "scheduler.json").read_text())["last_epoch"] == 4


def test_resume_refusals(cache_dir, models, uninterrupted, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(DadpoError, match=r"--resume: .*step-000008 comes from a run with other settings \(lr: 0.001 before, 0.002 now\)"):
        train(run_config(cache_dir, models, run, lr=2e-3, resume=True))
    with pytest.raises(DadpoError, match="holds checkpoints of an earlier run.*--resume.*--overwrite"):
        train(run_config(cache_dir, models, run))
    with pytest.raises(DadpoError, match="has no checkpoint"):
        train(run_config(cache_dir, models, tmp_path / "fresh", resume=True))
    assert (run / "summary.json").exists()  # the refusals changed nothing
    result = run_cli(*run_args(cache_dir, models, run), "--lr", "2e-3", "--resume", env=ENV)
    assert_one_line_error(result, "--resume", "other settings", "lr")
    # --overwrite starts over: old checkpoints and metrics go
    train(run_config(cache_dir, models, run, max_steps=2, save_every=None, overwrite=True))
    assert not (run / "checkpoints").exists() and [s["step"] for s in metrics(run)] == [1, 2]


def test_lora_dropout_run_resumes_exactly(cache_dir, models, tmp_path):
    """LoRA with dropout: the adapter, optimizer and the RNG state all come back."""
    settings = dict(cache=str(cache_dir), model=str(models["student_b"]), lr=5e-3, batch_size=4, grad_accum=1,
                    max_steps=4, seed=1, save_every=2, eval_fraction=0.0, lora_r=4, lora_dropout=0.2, progress=False)
    whole = tmp_path / "whole"
    train(TrainConfig(out=str(whole), **settings))
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    (cut / "summary.json").unlink()
    train(TrainConfig(out=str(cut), resume=True, **settings))
    assert (whole / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_steps(metrics(cut), metrics(whole), keys=("loss", "margin", "grad_norm"), tolerance=1e-6)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_equals_uninterrupted(cache_dir, models,
                                                                                    uninterrupted, tmp_path,
                                                                                    signal_number):
    """What SLURM sends before pre-emption: the step in flight finishes, a checkpoint of it is written
    (not only the last --save-every one), one line says how to resume, exit code 75."""
    out = tmp_path / "stopped"
    line = stop_line_after_steps(start_cli(*run_args(cache_dir, models, out), env=ENV), out, 3, signal_number)
    assert "stopped by SIG" in line and "--resume" in line, line
    done = len(metrics(out))
    assert 3 <= done < STEPS
    assert list_checkpoints(out)[-1].name == f"step-{done:06d}"  # the step the signal found, saved
    assert not (out / "summary.json").exists()
    summary = train(run_config(cache_dir, models, out, resume=True))
    assert summary["resumed_from_step"] == done
    assert_same_steps(metrics(out), metrics(uninterrupted), keys=("loss", "margin", "reward_accuracy", "lr", "grad_norm"),
                      tolerance=1e-6)


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer file"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(cache_dir, models, uninterrupted, tmp_path,
                                                                    damage, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "checkpoints" / "step-000008")
    (run / "summary.json").unlink()
    latest = run / "checkpoints" / "step-000006"
    if damage == "truncated weights":
        broken = latest / "model" / "model.safetensors"
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    else:
        broken = latest / "optimizer.json"
        broken.unlink()
    summary = train(run_config(cache_dir, models, run, resume=True))
    warning = capsys.readouterr().out
    assert str(broken) in warning and "step-000004" in warning
    assert summary["resumed_from_step"] == 4
    assert_same_steps(metrics(run), metrics(uninterrupted), keys=("loss", "margin", "lr", "grad_norm"), tolerance=1e-6)
