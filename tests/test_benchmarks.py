"""The benchmark scripts in their quick modes, each as a real subprocess: it prints its table,
writes its JSON, and the numbers in it are sane (finite, positive, the right arms). Speed itself
is never asserted here (a loaded CI machine would make that a coin toss); what is checked
exactly is what must hold at any speed: both trainers start at loss ln 2, prompt sharing
leaves every log-prob unchanged, vLLM's prefix cache is read only when asked for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ENV, REPO

BENCHMARKS = REPO / "benchmarks"


def run_bench(script: str, *args, tmp_path: Path, timeout: float = 300) -> tuple[str, dict]:
    """Run benchmarks/SCRIPT ARGS --json FILE; return its stdout and the JSON it wrote."""
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args), "--json", str(out)],
                            capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout, json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def vllm_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True,
                           env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    return probe.returncode == 0


def test_bench_scoring_quick(tmp_path):
    """hf modes always; the vllm modes too where vllm imports (as under CI: install.sh installs it),
    in the same run, so the test pays for one engine start. A broken vllm fails the vllm tests."""
    with_vllm = vllm_importable()
    modes = ["hf", "hf-shared"] + (["vllm", "vllm-shared"] if with_vllm else [])
    stdout, result = run_bench("bench_scoring.py", "--quick", "--modes", ",".join(modes), "--model-dir",
                               tmp_path / "models", tmp_path=tmp_path, timeout=600)
    assert "| hf-shared |" in stdout
    rows = result["modes"]
    assert set(rows) == set(modes)
    for mode, row in rows.items():
        assert positive(row["tokens_per_s"]) and positive(row["flops_per_s"]) and positive(row["start_s"]), mode
    assert positive(result["ratios"]["hf-shared/hf"]) and positive(result["ratios"]["hf-shared/hf cpu"])
    # every mode scores the same pairs to the same log-probs (fp32): prompts shared or not, hf or vllm
    assert set(result["max_rel_logp_difference"]) == {f"{mode} vs hf" for mode in modes[1:]}
    for name, relative in result["max_rel_logp_difference"].items():
        assert relative < 1e-5, (name, relative)
    assert rows["hf-shared"]["shared_prompt_tokens"] == result["prompt_tokens"]  # every prompt computed once
    if with_vllm:
        # score() never reads the prefix cache; score_pairs() reads prompts from it (32-token blocks, quick
        # prompts of 32-64 tokens; how many hit depends on vLLM's scheduling), never more than the prompts
        assert rows["vllm"]["shared_prompt_tokens"] == 0
        assert 0 < rows["vllm-shared"]["shared_prompt_tokens"] <= result["prompt_tokens"]
        assert positive(result["ratios"]["vllm-shared/vllm"]) and positive(result["ratios"]["vllm/hf"])


def test_bench_vs_trl_quick(tmp_path):
    pytest.importorskip("trl")
    stdout, result = run_bench("bench_vs_trl.py", "--quick", tmp_path=tmp_path)
    assert "| trl |" in stdout
    rows, agreement = result["rows"], result["agreement"]
    assert set(rows) == {"trl", "dadpo", "dadpo-unshared"}
    assert rows["dadpo"]["shared"] is True and rows["dadpo-unshared"]["shared"] is False
    for arm, row in rows.items():
        for key in ("ref_s", "ref_tokens_per_s", "step_s", "peak_rss_train_mb", "train_flops_per_s"):
            assert positive(row[key]), (arm, key, row[key])
        # policy == reference at step 0: every margin is 0, the loss is ln 2
        assert abs(row["first_loss"] - math.log(2)) < 1e-5, (arm, row["first_loss"])
        # each arm's reference log-probs (shared prompts or not) against a plain full-logits forward (fp32)
        assert row["max_ref_rel_vs_plain"] < 1e-5, arm
    assert agreement["max_first_loss_spread"] < 1e-5
    # quick: every step trains on the same 4 pairs at lr 1e-3, so the same loss is optimised from the
    # same start with the same AdamW: the curves agree step by step, not only at step 0
    assert len(rows["trl"]["losses"]) == 3 and rows["trl"]["losses"][-1] < rows["trl"]["losses"][0] - 1e-3
    assert agreement["max_loss_curve_spread"] < 1e-5
    for name, ratio in result["ratios"].items():
        assert positive(ratio), name


def test_gpu_suite_dry_run_lists_every_component(tmp_path):
    env = {**os.environ, **ENV}
    gpu = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert gpu.returncode == 0, gpu.stderr
    for name, config in (("scoring-1.5b", "qwen2.5-1.5b"), ("scoring-7b", "qwen2.5-7b"), ("train-0.5b", "qwen2.5-0.5b"),
                         ("train-1.5b", "qwen2.5-1.5b"), ("train-0.5b-packed", "--packing"), ("vs-trl-0.5b", "qwen2.5-0.5b")):
        line = next(line for line in gpu.stdout.splitlines()[1:] if f"{name}.json" in line)
        assert "--device cuda" in line and config in line, line
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--device", "cpu"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "--device cpu needs --quick" in refused.stderr


def test_bench_train_quick_through_the_gpu_suite(tmp_path):
    """bench_train at quick shapes (packed micro-batches, every arm), run by the suite as on a GPU:
    the script's JSON is sane and becomes rows of the suite's one table."""
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--device", "cpu", "--quick",
                             "--only", "train-0.5b-packed", "--out", str(tmp_path), "--json", str(tmp_path / "suite.json")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| component | arm / mode |" in result.stdout
    for arm in ("a-shared", "a-unshared", "b", "c", "s", "b2", "ratios"):
        assert f"| train-0.5b-packed | {arm} |" in result.stdout, arm
    bench = json.loads((tmp_path / "train-0.5b-packed.json").read_text())
    assert bench["args"]["packing"] is True
    assert bench["shared"] is True  # Qwen2 with sdpa takes the prefix-sharing mask, packed too
    for arm, row in bench["rows"].items():
        assert positive(row["seconds"]) and positive(row["wall_s"]) and positive(row["flops_per_s"]), (arm, row)
    for name in ("a-shared/a-unshared", "a-unshared/b", "b2/b", "c/a-shared", "sweep live/cached"):
        assert positive(bench["ratios"][name]), name
    # the student's log-probs with prompts shared equal the unshared ones (fp32)
    assert bench["side"]["shared_vs_unshared_max_rel"] < 1e-5
    # sharing computes each prompt once: fewer tokens than the unshared layout
    assert 0 < bench["tokens_per_step"]["shared"] < bench["tokens_per_step"]["unshared"]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["results"]["train-0.5b-packed"]["status"] == "ok"


def test_bench_judge_quick(tmp_path):
    """dadpo eval against a loopback judge, quick: the table and sane numbers (speed is not asserted)."""
    stdout, result = run_bench("bench_judge.py", "--quick", tmp_path=tmp_path)
    assert result["judgments"] == 200 and result["concurrency"] == 64
    assert positive(result["first_run_wall_s"]) and positive(result["rerun_wall_s"])
    assert math.isfinite(result["cpu_ms_per_judgment"]) and result["cpu_ms_per_judgment"] >= 0
    assert "| 200 | 64 |" in stdout
