"""Plain helpers the tests share (fixtures live in conftest.py): running the CLI as a real
subprocess, one-line error checks, the one log-prob oracle, and cache/run inspection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from dadpo.stop import EXIT_STOPPED

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread per process: on a loaded 2-core machine more threads only contend.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# A vLLM engine started lean on CPU, for tests whose subject is not vLLM's process layout: the engine
# core and its worker in the process that builds the engine (no multiprocessing: vLLM's "uni"
# executor), two processes fewer importing vllm and torch (~14 s of CPU each) per start; the same
# scores and samples. VLLM_EAGER (for --vllm-arg or EngineOptions.extra): no graph compilation
# (~30 s of CPU per start, nothing gained on a few prompts).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM_EAGER = {"enforce_eager": True}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `dadpo ARGS...` as a real subprocess (python -m dadpo.cli.main, the console script's target)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dadpo.cli.main", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args, env: dict | None = None) -> subprocess.Popen:
    """`dadpo ARGS...` as a subprocess that keeps running (run_cli waits for it)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dadpo.cli.main", *map(str, args)], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when(process: subprocess.Popen, ready, signal_number: int = 9, timeout: float = 180) -> bool:
    """Send `signal_number` (default SIGKILL) to `process` as soon as ready() holds (polled every 5 ms).
    True if it was signalled while still running, False if it had exited by itself first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            process.communicate()
            return False
        if ready():
            process.send_signal(signal_number)
            if signal_number == 9:
                process.communicate()
                return process.returncode == -9
            return True
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"the condition to signal at never came: {process.communicate()[1][-2000:]}")


def cli_flags(settings: dict) -> list:
    """{"batch_size": 2, ...} -> ["--batch-size", 2, ...]: one config's settings as the CLI's flags."""
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", value)]


def stop_line_after_steps(process: subprocess.Popen, run: Path, steps: int, signal_number: int) -> str:
    """Send a stop signal once `run` has logged `steps` training steps; the process must exit with
    EXIT_STOPPED and print exactly one line on stderr, which is returned."""
    log = run / "metrics.jsonl"
    assert signal_when(process, lambda: log.exists() and len(log.read_text().splitlines()) >= steps, signal_number)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> bool:
    """SIGKILL `process` as soon as ready() holds: no cleanup handlers run."""
    return signal_when(process, ready, 9, timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Bad input: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- pairs files in every format


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_datasets(path: Path, rows: list[dict]) -> Path:
    """A datasets.save_to_disk folder holding one Dataset."""
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_data_folder(path: Path, splits: dict[str, list[dict]]) -> Path:
    """A folder of data files as the Hub lays them out (data/SPLIT-00000-of-00001.parquet), which
    datasets.load_dataset reads offline."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_parquet(path / "data" / f"{split}-00000-of-00001.parquet", rows)
    return path


# ---------------------------------------------------------------- local lm-eval tasks

LM_EVAL_MC_TASK, LM_EVAL_GEN_TASK = "dadpo_tiny_mc", "dadpo_tiny_gen"
_LM_EVAL_SUMS = [(12, 30), (3, 4), (5, 6), (7, 8), (9, 10)]
LM_EVAL_MC_ROWS = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), "seven", "I do not know"],
                    "label": 0} for a, b in _LM_EVAL_SUMS]
LM_EVAL_GEN_ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in _LM_EVAL_SUMS]
LM_EVAL_PROMPT = "Question: {question}\nAnswer:"
LM_EVAL_GEN_TOKENS, LM_EVAL_GEN_UNTIL = 8, "\n"


def write_lm_eval_tasks(folder: Path, mc_rows: list[dict] | None = None, gen_rows: list[dict] | None = None) -> Path:
    """Two offline lm-eval tasks in `folder` (YAML + jsonl, dataset_path: json): a multiple-choice one
    (LM_EVAL_MC_TASK, metric acc: the choice of highest log-likelihood after LM_EVAL_PROMPT) and a
    greedy generate_until one (LM_EVAL_GEN_TASK, exact_match of the text up to the first newline,
    at most LM_EVAL_GEN_TOKENS tokens). Pass the folder as include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    prompt = LM_EVAL_PROMPT.replace("{question}", "{{question}}").replace("\n", "\\n")
    common = "dataset_path: json\ntest_split: test\n" f'doc_to_text: "{prompt}"\n'
    for task, rows, body in [
        (LM_EVAL_MC_TASK, mc_rows or LM_EVAL_MC_ROWS,
         'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        (LM_EVAL_GEN_TASK, gen_rows or LM_EVAL_GEN_ROWS,
         'output_type: generate_until\ndoc_to_target: "{{answer}}"\n'
         f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {LM_EVAL_GEN_TOKENS}\n  do_sample: false\n'
         "metric_list:\n  - metric: exact_match\n"),
    ]:
        data = write_jsonl(folder / f"{task}.jsonl", rows)
        (folder / f"{task}.yaml").write_text(f"task: {task}\n{common}dataset_kwargs:\n  data_files:\n"
                                             f"    test: {json.dumps(str(data.resolve()))}\n{body}", encoding="utf-8")
    return folder


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



class LocalHttp:
    """A real HTTP server on loopback, in a thread: respond(method, path, headers, body) returns
    (status, headers, body bytes) for each request, which is recorded in .requests as (method, path,
    headers). `with LocalHttp(respond) as url:`; at exit, release is set (for a respond that hangs
    on it) and the server shuts down."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict]] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = dict(self.headers.items())
                owner.requests.append((self.command, self.path, headers))
                status, extra, data = respond(self.command, self.path, headers, body)
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **extra}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that gave up: not news
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- the oracle


def naive_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log p(response | prompt) from a plain full-vocabulary forward pass on one unpadded sequence:
    the independent computation every log-prob in dadpo is checked against."""
    ids = list(prompt_ids) + list(response_ids)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))


def naive_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """A plain argmax decode (a full forward per new token: no cache, no generate()) up to max_new_tokens
    or a stop id, which ends the returned ids: the independent check of every greedy path in dadpo."""
    ids: list[int] = []
    with torch.no_grad():
        while len(ids) < max_new_tokens:
            ids.append(int(model(torch.tensor([list(prompt_ids) + ids])).logits[0, -1].argmax()))
            if ids[-1] in stop_ids:
                break
    return ids


# ---------------------------------------------------------------- sentence log-prob tolerances

LOGP_ATOL = 1e-5  # nats: any sentence
LOGP_PER_TOKEN = 1e-6  # nats per summed token


def logp_tolerance(num_tokens):
    """How far two fp32 computations of one sentence log-prob may differ: LOGP_ATOL + LOGP_PER_TOKEN ×
    num_tokens (the response tokens summed; an int or an array, one per sentence). Differently
    shaped fp32 computations (batching, padding, chunks, shared prompts) round each position by
    ~1e-7 relative, and a sentence's sum of many tokens adds those up, so a bound for a short
    sentence is too tight for a long one, and one for a long one hides real errors in a short one."""
    return LOGP_ATOL + LOGP_PER_TOKEN * np.asarray(num_tokens, dtype=np.float64)


def assert_logps_close(actual, expected, num_tokens, what: str) -> None:
    """Each sentence log-prob in `actual` within logp_tolerance(its tokens) of `expected` (arrays,
    tensors, lists or numbers of one shape; num_tokens broadcasts). Equal infinities agree; the
    failure names `what`, the worst sentence, its tokens and both values."""
    got, want = _float64(actual), _float64(expected)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    tokens = np.broadcast_to(np.asarray(num_tokens), got.shape)
    with np.errstate(invalid="ignore"):
        error = np.where(got == want, 0.0, np.abs(got - want))
    error = np.where(np.isnan(error), np.inf, error)
    excess = error - logp_tolerance(tokens)
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        where = tuple(int(i) for i in worst)
        raise AssertionError(f"{what}: {int((excess > 0).sum())} of {excess.size} sentence log-probs differ by more "
                             f"than {LOGP_ATOL:g} + {LOGP_PER_TOKEN:g} × tokens; worst at {where}: {float(got[worst])!r} "
                             f"vs {float(want[worst])!r} ({int(tokens[worst])} tokens, off by {error[worst]:.3g})")


def loss_tolerance(beta_sum: float, chosen_tokens, rejected_tokens) -> float:
    """How far a logged (da)DPO loss, the mean over pairs of log(1 + exp(-u)), may be from one computed
    independently when the policy's sentence log-probs differ within logp_tolerance: u moves by at most
    beta_sum (β1 + β2) × the two sentences' tolerances, the loss by no more (|d/du log(1 + e^-u)| ≤ 1),
    plus 1e-6 for the loss's own fp32 arithmetic. Token counts: one per pair (arrays), or the largest."""
    per_pair = logp_tolerance(chosen_tokens) + logp_tolerance(rejected_tokens)
    return beta_sum * float(np.mean(per_pair)) + 1e-6


def _float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------- caches


def cache_args(pairs, models, out, *extra, reference: str = "student") -> list[str]:
    """A cache-teacher command line (hf backend, shards of 4 pairs)."""
    return ["cache-teacher", "--pairs", str(pairs), "--teacher", str(models["teacher"]),
            "--reference", str(models[reference]), "--out", str(out), "--backend", "hf", "--shard-size", "4",
            *map(str, extra)]


def shard_rows(cache_dir: Path) -> pl.DataFrame:
    files = sorted((Path(cache_dir) / "shards").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def leftovers(cache_dir: Path) -> list[str]:
    """Temporary files and scratch that a finished cache must not hold."""
    root = Path(cache_dir)
    found = [str(p.relative_to(root)) for p in root.rglob("*.tmp")]
    return found + [name + "/" for name in ("work", ".claims") if (root / name).exists()]


def assert_same_cache(cache_dir: Path, clean_dir: Path) -> None:
    """Same rows, same ids in the same order, the same values, the same manifest entries. A resumed
    shard is computed exactly as the clean one (same batches, same process), so values match exactly."""
    got, want = json.loads((cache_dir / "manifest.json").read_text()), json.loads((clean_dir / "manifest.json").read_text())
    assert got["complete"] and got["totals"] == want["totals"]
    assert got["shards"] == want["shards"]  # rows, pair ranges, dropped ids, sha256 of every file
    rows, clean_rows = shard_rows(cache_dir), shard_rows(clean_dir)
    assert rows["id"].n_unique() == rows.height  # no pair twice
    assert rows.equals(clean_rows)
    assert (cache_dir / "dropped_ids.txt").read_text() == (clean_dir / "dropped_ids.txt").read_text()
    assert leftovers(cache_dir) == []


def assert_nothing_complete(out: Path) -> None:
    """After a refused run: no shard and no manifest that could pass for a finished cache."""
    out = Path(out)
    if not out.exists():
        return
    assert not list(out.rglob("shard-*.parquet")), sorted(out.rglob("*"))
    manifest = out / "manifest.json"
    if manifest.exists():
        assert json.loads(manifest.read_text())["complete"] is False


# ---------------------------------------------------------------- training runs


def train_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    result = run_cli("train", *args, "--quiet", env={**ENV, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run) / name).read_text().splitlines() if line.strip()]


def assert_same_steps(got: list[dict], want: list[dict], keys=("loss", "margin", "reward_accuracy", "lr"),
                      tolerance: float = 1e-6) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for a, b in zip(got, want):
        for key in keys:
            assert abs(a[key] - b[key]) <= tolerance * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


# ---------------------------------------------------------------- a scripted judge server


class ScriptedJudge:
    """A real OpenAI-compatible /v1/chat/completions server on loopback whose replies the test
    writes: reply(prompt_text, payload) -> the reply text. Counts every request it received and the
    prompts it answered; `die_after=N` closes the server (connections refused) after N answers;
    `api_key` makes it refuse requests without that bearer token (401)."""

    def __init__(self, reply, *, api_key: str | None = None, die_after: int | None = None, delay_s: float = 0.0):
        import http.server
        import threading

        self.reply, self.api_key, self.die_after, self.delay_s = reply, api_key, die_after, delay_s
        self.received: list[dict] = []  # every chat request's payload
        self.answered: list[str] = []  # the prompts answered with a 200
        self.lock = threading.Lock()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if judge.api_key and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                    self._send(401, {"error": {"message": "invalid API key"}})
                    return False
                return True

            def do_GET(self):
                if self._authorised():
                    self._send(200, {"object": "list", "data": [{"id": "scripted"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                prompt = payload["messages"][-1]["content"]
                with judge.lock:
                    judge.received.append(payload)
                if judge.delay_s:
                    time.sleep(judge.delay_s)
                text = judge.reply(prompt, payload)
                with judge.lock:
                    if judge.die_after is not None and len(judge.answered) >= judge.die_after:
                        self.close_connection = True
                        return  # dead: no answer (the client sees the connection closed)
                    judge.answered.append(prompt)
                    dying = judge.die_after is not None and len(judge.answered) >= judge.die_after
                self._send(200, {"id": "x", "object": "chat.completion", "model": payload.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})
                if dying:
                    threading.Thread(target=judge.close, daemon=True).start()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
