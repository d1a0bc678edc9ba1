"""The whole pipeline from prompts to a trained student, as a user runs it: each step a `dadpo`
subprocess (hf backend, tiny models), each reading the previous step's output.

    prompts --generate--> pairs --sft--> reference --cache-teacher--> cache --train--> student
                                                                     cache --inspect--> report + PNG
"""

from __future__ import annotations

import json

import polars as pl
from transformers import AutoModelForCausalLM

from support import run_cli, write_jsonl
from dadpo.pairs import load_pairs
from dadpo.tiny import make_tiny_pairs


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def test_generate_sft_cache_train_inspect(models, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": p["id"], "prompt": p["prompt"]} for p in make_tiny_pairs(24, seed=7)])
    pairs, sft_run, cache, run = (tmp_path / name for name in ("pairs.parquet", "sft", "cache", "run"))

    out = _ok(run_cli("generate", "--prompts", prompts, "--teacher", models["teacher"], "--student", models["student"],
                      "--out", pairs, "--backend", "hf", "--max-new-tokens", 24, "--temperature", 1.0, "--seed", 1,
                      "--quiet"))
    kept = len(load_pairs(pairs))
    assert f"wrote {kept} pairs" in out and kept >= 16

    out = _ok(run_cli("sft", "--pairs", pairs, "--model", models["student"], "--out", sft_run, "--lr", "1e-3",
                      "--batch-size", 4, "--grad-accum", 1, "--max-steps", 3, "--eval-fraction", 0, "--quiet"))
    steps = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(s["tokens"] > 0 for s in steps)
    AutoModelForCausalLM.from_pretrained(sft_run / "model")

    out = _ok(run_cli("cache-teacher", "--pairs", pairs, "--teacher", models["teacher"], "--reference",
                      sft_run / "model", "--out", cache, "--backend", "hf", "--max-length", 256, "--quiet"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["reference"]["model"] == str(sft_run / "model")
    assert manifest["totals"]["rows"] + manifest["totals"]["dropped"] == kept

    out = _ok(run_cli("train", "--cache", cache, "--out", run, "--beta1", 0.1, "--beta2", 0.01, "--lr", "1e-4",
                      "--batch-size", 4, "--grad-accum", 1, "--max-steps", 2, "--eval-fraction", 0, "--quiet"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    student = AutoModelForCausalLM.from_pretrained(run / "model")
    start = AutoModelForCausalLM.from_pretrained(sft_run / "model")
    assert any((a != b).any() for a, b in zip(student.state_dict().values(), start.state_dict().values()))

    out = _ok(run_cli("inspect", cache, "--png", tmp_path / "margins.png"))
    assert f"{manifest['totals']['rows']} cached of {kept}" in out and (tmp_path / "margins.png").is_file()
    assert pl.read_parquet(pairs).columns[:4] == ["id", "prompt", "chosen", "rejected"]
