"""A full disk (a real, small tmpfs) while cache-teacher writes its shards, train its checkpoints and
model, and generate its output: one line naming the file and the space it needed, nothing that looks
complete, and the same command continues once space is freed (the tmpfs remounted larger)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from support import (assert_nothing_complete, assert_one_line_error, assert_same_cache, cache_args, metrics,
                     run_cli, write_jsonl)
from dadpo.tiny import make_tiny_pairs


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size mounted under tmp_path (root only); resize(size) remounts it larger."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: str) -> None:
        options = f"size={size}" if not os.path.ismount(mount) else f"remount,size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)

    resize.path = mount
    yield resize
    subprocess.run(["umount", str(mount)], check=False)


def no_space(result, where) -> str:
    line = assert_one_line_error(result, str(where), "no space left on the device", "needed", "free",
                                 "re-run the same command")
    return line


def test_cache_teacher_on_a_full_disk_resumes_once_space_is_freed(models, small_disk, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(24, seed=0))
    clean = tmp_path / "clean"
    assert run_cli(*cache_args(pairs, models, clean, "--quiet")).returncode == 0
    small_disk("96k")  # room for the plan and the scores, not for the shards
    out = small_disk.path / "cache"
    args = cache_args(pairs, models, out, "--quiet")
    no_space(run_cli(*args), small_disk.path)
    assert_nothing_complete(out)
    assert not list(out.rglob("*.tmp"))  # the file that did not fit is gone, not left half-written
    small_disk("16m")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert_same_cache(out, clean)


def test_train_on_a_full_disk_resumes_from_its_last_checkpoint(models, cache_dir, small_disk, tmp_path):
    common = ["train", "--cache", cache_dir, "--model", models["student_b"], "--batch-size", 4, "--grad-accum", 1,
              "--max-steps", 3, "--save-every", 1, "--lr", "1e-3", "--eval-fraction", 0.1, "--quiet"]
    whole = tmp_path / "whole"
    assert run_cli(*common, "--out", whole).returncode == 0
    small_disk("8m")  # one checkpoint (~5 MB: weights and AdamW state) fits, not two
    out = small_disk.path / "run"
    no_space(run_cli(*common, "--out", out), small_disk.path)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # no .partial, no step 2
    assert not (out / "summary.json").exists()
    small_disk("64m")
    result = run_cli(*common, "--out", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 1
    assert [s["loss"] for s in metrics(out)] == pytest.approx([s["loss"] for s in metrics(whole)], abs=1e-6)


def test_generate_on_a_full_disk_keeps_its_finished_chunks(models, small_disk, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": p["id"], "prompt": p["prompt"]}
                                                       for p in make_tiny_pairs(12, seed=2)])
    small_disk("24k")
    out = small_disk.path / "pairs.parquet"
    args = ["generate", "--prompts", prompts, "--teacher", models["teacher"], "--student", models["student"],
            "--out", out, "--backend", "hf", "--max-new-tokens", 24, "--chunk-size", 4, "--quiet"]
    no_space(run_cli(*args), small_disk.path)
    assert not out.exists() and not list(small_disk.path.rglob("*.tmp"))
    small_disk("16m")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert out.exists()
