"""The served-model client (dadpo.scoring.client) against real HTTP servers on loopback: the key
goes as `Authorization: Bearer` and is never shown; a URL's user:password@ goes as basic auth and
is removed from every message; a refused key, an unset key variable and a redirect are each one
line; and cache-teacher's start-up probe obeys --server-timeout and --server-retries against a
server that never answers. (Against a real vLLM server with --api-key: test_vllm_server.py.)
"""

from __future__ import annotations

import base64
import json

import pytest
from transformers import AutoTokenizer

from dadpo.cache.models import named
from dadpo.errors import DadpoError
from dadpo.scoring.client import Http, key_from_env, redact_url
from dadpo.scoring.server import probe_server
from support import LocalHttp, assert_one_line_error, free_port, run_cli, write_jsonl

QUICK = dict(timeout_s=5, retries=0, backoff_s=0.05, where="--teacher-url")
KEY = "sk-test-0123456789abcdef"


def models_answer(method, path, headers, body):
    return 200, {}, json.dumps({"data": [{"id": "m", "max_model_len": 64}]}).encode()


def keyed(method, path, headers, body):
    """A server started with --api-key KEY (vLLM's answer without it: 401 {"error": "Unauthorized"})."""
    if headers.get("Authorization") != f"Bearer {KEY}":
        return 401, {}, b'{"error": "Unauthorized"}'
    return models_answer(method, path, headers, body)


def one_line(exc: pytest.ExceptionInfo, *fragments: str, hidden: tuple[str, ...] = ()) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    for secret in hidden:
        assert secret not in message, message
    return message


# ---------------------------------------------------------------- the key


def test_the_key_goes_as_a_bearer_header():
    server = LocalHttp(keyed)
    with server as url:
        assert Http(url, api_key=KEY, key_source="$K", **QUICK).call("/v1/models")["data"][0]["id"] == "m"
    assert server.requests[0][2]["Authorization"] == f"Bearer {KEY}"


def test_a_wrong_or_missing_key_is_one_line_naming_its_source():
    with LocalHttp(keyed) as url:
        with pytest.raises(DadpoError) as exc:
            Http(url, api_key="sk-wrong-key", key_source="$TEACHER_KEY", **QUICK).call("/v1/models")
        one_line(exc, f"--teacher-url {url}: ", "the server refused the key (from $TEACHER_KEY; 401",
                 hidden=("sk-wrong-key",))
        with pytest.raises(DadpoError) as exc:
            Http(url, key_source="--teacher-api-key-env VAR", **QUICK).call("/v1/models")
        one_line(exc, "refused the key (none was given: give it with --teacher-api-key-env VAR; 401")


def test_a_refused_key_is_never_retried():
    refusals = LocalHttp(lambda *request: (403, {}, b'{"detail": "Forbidden"}'))
    with refusals as url:
        with pytest.raises(DadpoError) as exc:
            Http(url, api_key=KEY, key_source="$K", timeout_s=5, retries=3, backoff_s=0.05,
                 where="--reference-url").call("/v1/models")
    one_line(exc, "--reference-url", "refused the key (from $K; 403: Forbidden)", hidden=(KEY,))
    assert len(refusals.requests) == 1


@pytest.mark.parametrize("bad_key", ["two\nlines", "tab\tsecret", "ключ", "   "])
def test_a_key_that_cannot_be_a_header_is_refused_unshown(bad_key):
    with pytest.raises(DadpoError) as exc:
        Http("http://127.0.0.1:9", api_key=bad_key, key_source="$K", **QUICK)
    one_line(exc, "the key from $K is empty or holds spaces, control or non-ASCII characters",
             hidden=tuple(part for part in bad_key.split() if part))


def test_key_from_env(monkeypatch):
    monkeypatch.setenv("DADPO_SOME_KEY", KEY)
    assert key_from_env("DADPO_SOME_KEY", "--teacher-api-key-env") == (KEY, "$DADPO_SOME_KEY")
    monkeypatch.delenv("DADPO_SOME_KEY")
    with pytest.raises(DadpoError) as exc:
        key_from_env("DADPO_SOME_KEY", "--teacher-api-key-env", "big")
    one_line(exc, "--teacher-api-key-env big=DADPO_SOME_KEY: the environment variable DADPO_SOME_KEY is not set")
    monkeypatch.setenv("DADPO_SOME_KEY", "")
    with pytest.raises(DadpoError) as exc:
        key_from_env("DADPO_SOME_KEY", "--reference-api-key-env")
    one_line(exc, "--reference-api-key-env DADPO_SOME_KEY: the environment variable DADPO_SOME_KEY is empty")
    with pytest.raises(DadpoError) as exc:  # the key itself given where its variable's name belongs
        key_from_env(KEY, "--reference-api-key-env")
    one_line(exc, "--reference-api-key-env VAR: give the name of the environment variable", hidden=(KEY,))


# ---------------------------------------------------------------- credentials in the URL


def test_url_credentials_go_as_basic_auth_and_are_never_shown(models):
    server = LocalHttp(models_answer)
    with server as url:
        with_credentials = url.replace("http://", "http://dadpo:p%40ss-w0rd@") + "/v1/"
        client = Http(with_credentials, **QUICK)
        assert client.url == url
        client.call("/v1/models")
        tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
        with pytest.raises(DadpoError) as exc:  # a record that is no version: a refusal naming the URL
            probe_server(with_credentials, tokenizer=tokenizer, max_length=None, retries=0)
    one_line(exc, f"--teacher-url {url}: GET /version did not answer", hidden=("p%40ss", "p@ss", "dadpo:"))
    sent = server.requests[0][2]["Authorization"]
    assert sent == "Basic " + base64.b64encode(b"dadpo:p@ss-w0rd").decode()
    with pytest.raises(DadpoError) as exc:
        Http(with_credentials, api_key=KEY, key_source="$K", **QUICK)
    one_line(exc, "both the URL's user:password@ and the key from $K give credentials", hidden=("p%40ss", KEY))


def test_redact_url():
    assert redact_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert redact_url("https://a@b:c@host/x?q=y@z") == "https://host/x?q=y@z"
    assert redact_url("user:pw@host:8000") == "host:8000"
    assert redact_url("http://host:8000/a@b") == "http://host:8000/a@b"  # an @ in the path is no credential
    assert redact_url("http://[::1") == "http://[::1"
    with pytest.raises(DadpoError) as exc:
        Http("user:pw@host:8000", **QUICK)
    one_line(exc, "host:8000: not an http(s) URL", hidden=("pw",))
    with pytest.raises(DadpoError) as exc:  # cache-teacher's reading of --teacher-url
        named(["big=http://u:pw@host:1", "big=http://u:pw@host:2"], "--teacher-url")
    one_line(exc, "--teacher-url big=http://host:2: the teacher 'big' is given twice", hidden=("pw",))
    with pytest.raises(DadpoError) as exc:
        named(["http://u:pw@host:1", "b=http://u:pw@host:2"], "--teacher-url")
    one_line(exc, "name each one (NAME=...): http://host:1, b=http://host:2", hidden=("pw",))


def test_a_redirect_is_not_followed():
    """A server that redirects elsewhere (here to a second server that records what it gets): the
    key and the URL's credentials stay home, and the redirect is one line."""
    elsewhere = LocalHttp(models_answer)
    with elsewhere as other_url:
        target = other_url.replace("http://", "http://user:pw@") + "/v1/models"
        with LocalHttp(lambda *request: (302, {"Location": target}, b"")) as url:
            with pytest.raises(DadpoError) as exc:
                Http(url, api_key=KEY, key_source="$K", **QUICK).call("/v1/models")
    one_line(exc, f"{url}: GET /v1/models answered a redirect (302 to {other_url}/v1/models)",
             "does not follow redirects", hidden=(KEY, "pw"))
    assert elsewhere.requests == []


# ---------------------------------------------------------------- cache-teacher's flags


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    from dadpo.tiny import make_tiny_pairs

    return write_jsonl(tmp_path_factory.mktemp("few-pairs") / "pairs.jsonl", make_tiny_pairs(4, seed=3))


def served_cache_args(few_pairs, models, out, url, *extra):
    return ["cache-teacher", "--pairs", few_pairs, "--teacher", models["teacher"], "--teacher-url", url,
            "--reference", models["student"], "--out", out, "--backend", "hf", "--quiet", *extra]


def test_key_flags_refuse_unset_variables_and_unserved_models(few_pairs, models, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    env = {"DADPO_UNSET_KEY": ""}
    result = run_cli(*served_cache_args(few_pairs, models, tmp_path / "c1", url, "--teacher-api-key-env",
                                        "DADPO_NO_SUCH_KEY_VAR"))
    assert_one_line_error(result, "--teacher-api-key-env DADPO_NO_SUCH_KEY_VAR: the environment variable "
                          "DADPO_NO_SUCH_KEY_VAR is not set")
    result = run_cli(*served_cache_args(few_pairs, models, tmp_path / "c2", url, "--reference-api-key-env",
                                        "DADPO_UNSET_KEY"), env=env)
    assert_one_line_error(result, "--reference-api-key-env DADPO_UNSET_KEY: that model is not served "
                          "(no --reference-url URL)")
    result = run_cli(*served_cache_args(few_pairs, models, tmp_path / "c3", url, "--teacher-api-key-env",
                                        "other=DADPO_UNSET_KEY"), env=env)
    assert_one_line_error(result, "--teacher-api-key-env: no --teacher named other")
    assert not any((tmp_path / name).exists() for name in ("c1", "c2", "c3"))


def test_the_start_up_probe_obeys_server_timeout_and_retries(few_pairs, models, tmp_path):
    """A server that takes connections and never answers: the probe gives up after
    --server-retries retries of --server-timeout each (the run's own 120 s bound would end a probe
    that waited the default 300 s; the probe's former fixed 2 retries would make 3 requests)."""
    retries = 1
    hanging = LocalHttp(lambda *request: (hanging.release.wait(300), (200, {}, b"{}"))[1])
    with hanging as url:
        result = run_cli(*served_cache_args(few_pairs, models, tmp_path / "cache", url, "--server-timeout", "0.5",
                                            "--server-retries", retries), timeout=120)
    assert_one_line_error(result, f"--teacher-url {url}: GET /v1/models failed after {retries + 1} tries",
                          "timed out")
    assert [request[:2] for request in hanging.requests] == [("GET", "/v1/models")] * (retries + 1)
