"""dadpo verify-cache: re-scoring cached rows with the trainer's forward pass and reporting the drift.

Caches come from the real pipeline (cache_teacher on the tiny models, hf backend): one in
float32, one in bfloat16. Re-scored in float32 the first drifts by float rounding only (within
support.logp_tolerance: 1e-5 + 1e-6 nats a token), the second clearly; a policy with other weights
(student_b) drifts by whole nats.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from support import assert_one_line_error, logp_tolerance, run_cli
from dadpo.cache import open_cache
from dadpo.cache import CacheTeacherConfig, cache_teacher
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseLogprobs
from dadpo.config import VerifyConfig
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.verify import (PAIR_COLUMNS, REFERENCE_COLUMNS, reference_drift, sample_rows, teacher_columns,
                          teacher_drift, verify_cache)

LINE = re.compile(r"^(reference|teacher) (ref|teacher)_logp_\* \(cached: hf (float32|bfloat16)\) vs (\S+) "
                  r"\[float32, cpu\], (\d+) pairs: \|delta\| per sequence mean (\S+) p95 (\S+) max (\S+) nats; "
                  r"per token mean (\S+) p95 (\S+) max (\S+) nats; signed mean (\S+) \((\d+) sequences\)$")


@pytest.fixture(scope="module")
def caches(models, pairs_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    made = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CacheTeacherConfig(pairs=str(pairs_file), teacher=str(models["teacher"]), reference=str(models["student"]),
                                 out=str(root / dtype), backend="hf", dtype=dtype, shard_size=16, progress=False)
        assert cache_teacher(cfg).complete
        made[dtype] = root / dtype
    return made


def token_counts(frame: pl.DataFrame, prefix: str) -> np.ndarray:
    """Every sequence's response tokens under one model (PREFIX_ntok_chosen, then _rejected)."""
    return np.concatenate([frame[f"{prefix}_ntok_{side}"].to_numpy() for side in ("chosen", "rejected")])


def assert_rounding_only(stats: tuple | dict, tokens: np.ndarray) -> None:
    """Drift statistics (parse's, or drift_stats' dict) within what fp32 rounding gives sentences of
    these token counts: per sequence logp_tolerance(n); per token logp_tolerance(n) / n."""
    if isinstance(stats, dict):
        seq_max, tok_max = stats["seq_max"], stats.get("tok_max")
    else:
        seq_max, tok_max = stats[1][2], stats[2][2]
    assert seq_max <= logp_tolerance(tokens.max()), (seq_max, tokens.max())
    if tok_max is not None:
        assert tok_max <= (logp_tolerance(tokens) / tokens).max(), (tok_max, tokens.min())


def parse(stdout: str) -> dict:
    """{group: (pairs, [seq mean, p95, max], [token mean, p95, max], sequences)} from verify-cache's lines."""
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("cache ") and "complete" in lines[0], stdout
    groups = {}
    for line in lines[1:]:
        match = LINE.match(line)
        assert match, f"unexpected line: {line!r}"
        values = match.groups()
        groups[values[0]] = (int(values[4]), [float(v) for v in values[5:8]], [float(v) for v in values[8:11]],
                             int(values[12]))
    return groups


def test_a_float32_cache_does_not_drift_from_the_trainer(caches):
    result = run_cli("verify-cache", "--cache", caches["float32"], "--teacher")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"cache {caches['float32']}: complete, 3 shards verified, 40 pairs, "
                                             "0 dropped by the length rule")
    groups = parse(result.stdout)
    assert set(groups) == {"reference", "teacher"}
    frame = open_cache(caches["float32"]).read()
    for group, prefix in (("reference", "ref"), ("teacher", "teacher")):
        pairs, per_sequence, per_token, sequences = groups[group]
        assert pairs == 40 and sequences == 80
        assert per_sequence[0] <= per_sequence[1] <= per_sequence[2]
        assert_rounding_only(groups[group], token_counts(frame, prefix))


def test_a_bfloat16_cache_drifts_clearly(caches):
    result = run_cli("verify-cache", caches["bfloat16"], "--teacher", "--sample", 16, "--seed", 3)
    assert result.returncode == 0, result.stderr
    groups = parse(result.stdout)
    for pairs, per_sequence, per_token, sequences in groups.values():
        assert pairs == 16 and sequences == 32
        assert per_sequence[2] > 1e-3 and per_sequence[0] > 1e-4 and per_token[2] > 1e-5


def test_another_policy_drifts_and_max_drift_fails_the_run(caches, models):
    refused = run_cli("verify-cache", "--cache", caches["float32"], "--model", models["student_b"],
                      "--max-drift", 0.01)
    assert refused.returncode == 1
    groups = parse(refused.stdout)
    assert set(groups) == {"reference"} and groups["reference"][1][2] > 0.1
    line = assert_one_line_error(refused, "reference drift", "exceeds --max-drift 0.01")
    assert f"{groups['reference'][1][2]:.3g} nats per sequence" in line


def test_integrity_only_and_bad_input(caches, models):
    result = run_cli("verify-cache", caches["float32"], "--sample", 0)
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 1, result.stdout
    # the teacher's tokenizer is not the reference's: the cached ids would be meaningless
    assert_one_line_error(run_cli("verify-cache", caches["float32"], "--model", models["teacher"]),
                          f"--model {models['teacher']}", "tokenizer or chat template differs")
    assert_one_line_error(run_cli("verify-cache", caches["float32"], "--sample", -1), "--sample -1")
    assert_one_line_error(run_cli("verify-cache", "--cache", caches["float32"] / "nope"), "no such folder")


def test_library_reuses_a_loaded_policy(caches, models):
    """What train calls at start: the policy it holds, a sample of rows; no second model load."""
    cache = open_cache(caches["float32"])
    rows = sample_rows(cache, 12, seed=0)
    assert rows.height == 12 and set(REFERENCE_COLUMNS) <= set(rows.columns)
    assert rows["pair_index"].is_sorted()
    pad_id = AutoTokenizer.from_pretrained(models["student"]).pad_token_id
    reference = AutoModelForCausalLM.from_pretrained(models["student"]).eval()
    policy = ResponseLogprobs(reference)
    policy.train()  # as the trainer holds it: the check must not leave it in eval mode, nor use dropout
    same = reference_drift(policy, rows, pad_id, batch_size=5)
    assert policy.training
    assert same["pairs"] == 12 and same["sequences"] == 24
    tokens = token_counts(rows, "ref")
    assert_rounding_only(same, tokens)
    # means of per-sequence deltas, each within its tolerance (a margin: two of them)
    assert abs(same["signed_mean"]) <= logp_tolerance(tokens).mean()
    assert abs(same["margin_mean"]) <= 2 * logp_tolerance(tokens).mean()
    other = reference_drift(AutoModelForCausalLM.from_pretrained(models["student_b"]), rows, pad_id)  # a bare LM
    assert other["seq_max"] > 0.1 and abs(other["margin_mean"]) > 1e-3

    everything = verify_cache(VerifyConfig(cache=str(caches["float32"]), sample=1000))
    assert everything["reference"]["pairs"] == 40 and everything["teacher"] is None
    assert everything["reference"]["prefix_shared"] is True  # re-scored as the trainer runs it: prompts once


def test_teacher_token_counts_must_match_the_cache(caches, models):
    cache = open_cache(caches["float32"])
    rows = sample_rows(cache, 4, columns=["id", *PAIR_COLUMNS, *teacher_columns("")])
    tokenizer = model_tokenizer(resolve_model(str(models["teacher"])), "--teacher")
    pad_id = tokenizer.tokenizer.pad_token_id
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    fine = teacher_drift(teacher, tokenizer, rows, pad_id)
    assert fine["sequences"] == 8
    assert_rounding_only(fine, token_counts(rows, "teacher"))
    bad_id = rows["id"][2]
    tampered = rows.with_columns(pl.when(pl.col("id") == bad_id).then(pl.col("teacher_ntok_rejected") + 1)
                                 .otherwise(pl.col("teacher_ntok_rejected")).alias("teacher_ntok_rejected"))
    with pytest.raises(DadpoError, match=f"row id '{bad_id}'.*rejected tokens.*teacher_ntok_rejected"):
        teacher_drift(teacher, tokenizer, tampered, pad_id, where="cache")
