"""dadpo generate on the tiny teacher/student (hf backend; one vllm run), through the library and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dadpo.stop import EXIT_STOPPED
from support import assert_one_line_error, run_cli, signal_when, start_cli, write_jsonl
from dadpo.errors import DadpoError
from dadpo.engine import EngineOptions
from dadpo.generate import METADATA_KEY, GenerateConfig, generate_pairs, read_generation_settings, work_dir
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.pairs import load_pairs, load_prompts
from dadpo.sampling import Sampling, sample_responses
from dadpo.tiny import make_tiny_pairs


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """12 prompts of every style (string, messages, system, earlier exchange) plus an extra column."""
    rows = [{"id": p["id"], "prompt": p["prompt"], "source": f"tiny-{i}"} for i, p in enumerate(make_tiny_pairs(12, seed=5))]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def _config(prompts, models, out, **overrides) -> GenerateConfig:
    settings = dict(prompts=str(prompts), teacher=str(models["teacher"]), student=str(models["student"]), out=str(out),
                    backend="hf", sampling=Sampling(max_new_tokens=12, temperature=1.0, seed=3), chunk_size=5,
                    engine=EngineOptions(batch_size=4), progress=False)
    settings.update(overrides)
    return GenerateConfig(**settings)


@pytest.fixture(scope="module")
def sampled(prompts_file, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "pairs.parquet"
    generate_pairs(_config(prompts_file, models, out))
    return out


def test_output_is_a_pairs_file_with_settings_recorded(sampled, prompts_file, models):
    pairs = load_pairs(sampled)  # the pairs spec, as cache-teacher reads it
    frame = pl.read_parquet(sampled)
    settings = read_generation_settings(sampled)
    assert len(pairs) + len(settings["dropped"]) == 12
    assert set(frame["chosen_finish_reason"]) <= {"stop", "length"}
    assert frame["source"].to_list() == [f"tiny-{int(row_id[-5:])}" for row_id in frame["id"]]  # extras travel
    assert settings["sampling"] == {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    assert settings["backend"] == "hf" and settings["teacher"]["model"] == str(models["teacher"])
    assert json.loads(pq.read_schema(sampled).metadata[METADATA_KEY.encode()]) == settings
    assert json.loads(Path(f"{sampled}.generate.json").read_text()) == settings
    assert not work_dir(sampled).exists()  # the progress folder goes once the output is whole


def test_each_model_stops_at_its_end_of_turn_and_the_sampled_ids_travel(sampled, models):
    """Each response carries its sampled ids: ending in a stop token ("stop") or cut at the limit
    ("length"); its text is their decoding without the stop token; the vocabulary is named."""
    frame = pl.read_parquet(sampled)
    for role, column, end_of_turn in (("teacher", "chosen", "<|im_end|>"), ("student", "rejected", "</s>")):
        tokenizer = AutoTokenizer.from_pretrained(models[role])
        stops = model_tokenizer(resolve_model(str(models[role])), f"--{role}").stop_ids
        assert tokenizer.convert_tokens_to_ids(end_of_turn) in stops
        for row in frame.iter_rows(named=True):
            ids, reason = row[f"{column}_token_ids"], row[f"{column}_finish_reason"]
            assert row[column][0]["role"] == "assistant"
            assert reason in ("stop", "length") and (ids[-1] in stops) == (reason == "stop")
            assert not any(token in stops for token in ids[:-1])
            body = ids[:-1] if reason == "stop" else ids
            assert row[column][0]["content"] == tokenizer.decode(body, skip_special_tokens=False,
                                                                 clean_up_tokenization_spaces=False)
            assert len(ids) <= 12
    assert frame["chosen_token_ids_vocab"].n_unique() == 1 and frame["rejected_token_ids_vocab"].n_unique() == 1
    assert frame["chosen_token_ids_vocab"][0] != frame["rejected_token_ids_vocab"][0]


def test_greedy_batched_equals_one_at_a_time(prompts_file, models, tmp_path):
    greedy = Sampling(max_new_tokens=10, temperature=0.0)
    outs = {}
    for batch_size in (1, 6):
        out = tmp_path / f"b{batch_size}.parquet"
        # the tiny teacher on both sides: the tiny student's greedy answer is only spaces (not a pair)
        generate_pairs(_config(prompts_file, models, out, sampling=greedy, engine=EngineOptions(batch_size=batch_size),
                               student=str(models["teacher"])))
        outs[batch_size] = pl.read_parquet(out)
    assert outs[1]["chosen"].to_list() == outs[6]["chosen"].to_list()
    assert outs[1].height > 0
    # the one-call sampler (used for evaluation) gives the same greedy responses
    prompts = outs[6]["prompt"].to_list()
    texts = sample_responses(str(models["teacher"]), prompts, greedy)
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    stops = set(model_tokenizer(resolve_model(str(models["teacher"])), "--teacher").stop_ids)
    assert texts == [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                     for ids in outs[6]["chosen_token_ids"].to_list()]


def test_seed_decides_the_samples(sampled, prompts_file, models, tmp_path):
    again = tmp_path / "again.parquet"
    generate_pairs(_config(prompts_file, models, again))
    assert pl.read_parquet(again)["chosen"].to_list() == pl.read_parquet(sampled)["chosen"].to_list()
    other = tmp_path / "other.parquet"
    generate_pairs(_config(prompts_file, models, other, sampling=Sampling(max_new_tokens=12, seed=4)))
    assert pl.read_parquet(other)["chosen"].to_list() != pl.read_parquet(sampled)["chosen"].to_list()


def test_rerun_is_a_no_op_and_other_settings_are_refused(sampled, prompts_file, models):
    before = sampled.stat().st_mtime_ns
    summary = generate_pairs(_config(prompts_file, models, sampled))
    assert summary.already_done and sampled.stat().st_mtime_ns == before
    with pytest.raises(DadpoError, match=r"sampling\.temperature"):
        generate_pairs(_config(prompts_file, models, sampled, sampling=Sampling(max_new_tokens=12, temperature=0.5,
                                                                               seed=3)))


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_an_interrupted_run_resumes_to_the_same_pairs(prompts_file, models, sampled, tmp_path, signal_number):
    """kill -9, or a stop signal, after the first chunk is on disk: the re-run keeps the finished chunks
    and ends with the same file. A stop signal finishes the chunk in flight and exits with 75."""
    out = tmp_path / "interrupted.parquet"
    args = ["generate", "--prompts", prompts_file, "--teacher", models["teacher"], "--student", models["student"],
            "--out", out, "--backend", "hf", "--max-new-tokens", 12, "--seed", 3, "--chunk-size", 5,
            "--batch-size", 4, "--quiet"]
    process = start_cli(*args)
    first = work_dir(out) / "teacher" / "00000.parquet"
    assert signal_when(process, first.exists, signal_number), "the run ended before it could be interrupted"
    _, stderr = process.communicate(timeout=300)
    if signal_number == signal.SIGTERM:
        assert process.returncode == EXIT_STOPPED, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], stderr
    assert first.exists() and not out.exists()
    assert not list(work_dir(out).rglob("*.tmp"))
    kept = len(list(first.parent.glob("*.parquet")))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"teacher: {12 - 5 * kept} responses" in result.stdout  # the finished chunks were kept, not redone
    assert pl.read_parquet(out).equals(pl.read_parquet(sampled))


def test_prompts_file_errors(tmp_path, models):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"promt": "typo"}])
    with pytest.raises(DadpoError, match=r"bad.jsonl line 2: 'prompt' is missing"):
        load_prompts(bad)
    no_column = write_jsonl(tmp_path / "none.jsonl", [{"question": "hi"}])
    with pytest.raises(DadpoError, match=r"missing column 'prompt'"):
        load_prompts(no_column)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"prompt": "same"}, {"prompt": "same"}])
    with pytest.raises(DadpoError, match=r"duplicate id .* \(lines 1 and 2\) \(the same prompt twice"):
        load_prompts(twice)
    # a pairs file works as a prompts file: its responses are not carried over
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(3))
    assert load_prompts(pairs).read().columns == ["id", "prompt"]


def test_cli_bad_input_is_one_line(tmp_path, prompts_file, models):
    common = ["--teacher", models["teacher"], "--student", models["student"]]
    assert_one_line_error(run_cli("generate", "--prompts", tmp_path / "missing.jsonl", *common, "--out",
                                  tmp_path / "o.parquet"), "missing.jsonl: no such file")
    assert_one_line_error(run_cli("generate", "--prompts", prompts_file, *common, "--out", tmp_path / "o.csv"),
                          "--out", ".parquet or .jsonl")
    assert_one_line_error(run_cli("generate", "--prompts", prompts_file, *common, "--out", tmp_path / "o.parquet",
                                  "--top-p", "0"), "--top-p 0.0")
    assert not (tmp_path / "o.parquet").exists()


def test_jsonl_output_with_sidecar(prompts_file, models, tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = generate_pairs(_config(prompts_file, models, out, sampling=Sampling(max_new_tokens=8, seed=1)))
    assert len(load_pairs(out)) == summary.rows
    assert read_generation_settings(out)["sampling"]["max_new_tokens"] == 8


_VLLM_SCRIPT = """
import json, sys
from dadpo.sampling import Sampling, sample_responses
from dadpo.engine import EngineOptions
if __name__ == "__main__":  # vLLM spawns processes
    prompts = json.loads(sys.argv[2])
    greedy = Sampling(max_new_tokens=10, temperature=0.0)
    options = EngineOptions(max_model_len=256)
    print(json.dumps({backend: sample_responses(sys.argv[1], prompts, greedy, backend=backend, engine=options)
                      for backend in ("hf", "vllm")}))
"""


@pytest.mark.vllm
def test_vllm_sampler_greedy_matches_hf(vllm_ready, models, tmp_path):
    """The vllm sampler (vllm.LLM.generate on token ids, our stop tokens, our decoding) gives the hf
    sampler's greedy responses. In a subprocess: importing vllm changes the process it runs in."""
    prompts = [p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
               for p in make_tiny_pairs(8, seed=9)]
    script = tmp_path / "sample.py"
    script.write_text(_VLLM_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(models["teacher"]), json.dumps(prompts)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    texts = json.loads(result.stdout.strip().splitlines()[-1])
    same = sum(a == b for a, b in zip(texts["hf"], texts["vllm"]))
    # fp32 on CPU: greedy paths agree unless two logits tie to within rounding
    assert len(texts["vllm"]) == 8 and same >= 7, texts
