"""The client for a served model: JSON over HTTP to one OpenAI-compatible server (Http), with
timeouts, retries with backoff, and the server's key.

A server started with --api-key gets the key as `Authorization: Bearer KEY` (key_from_env reads it
from the environment variable a flag names); credentials written into the URL
(http://user:pass@host) go as HTTP basic auth. Neither is ever printed or written: every message
and record names the URL without its user:pass@ part (redact_url), and redirects are not followed,
so no key travels to another host. The standard library's urllib does the HTTP.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

from dadpo.errors import DadpoError

_MAX_BACKOFF_S = 30.0
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Refused(Exception):
    """The server answered 4xx (not 429): bad input, never retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _split_userinfo(url: str) -> tuple[str | None, str]:
    """(the user:password of url's authority or None, url without it). Plain string work, so no URL
    however malformed raises here (and so shows up whole in a traceback)."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:authority_end].rpartition("@")
    if not at:
        return None, url
    return userinfo, f"{scheme}{sep}{host}{rest[authority_end:]}"


def redact_url(url: str) -> str:
    """url without the user:password@ it may carry: the form every message and record shows."""
    return _split_userinfo(url)[1]


def normalize_url(url: str) -> str:
    """The server's base URL: no trailing slash, no /v1 (OpenAI clients' base_url carries it), and
    no user:password@ (redact_url; Http sends those as basic auth)."""
    base = redact_url(url).rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    if not base.startswith(("http://", "https://")):
        raise DadpoError(f"{base or repr(url)}: not an http(s) URL (e.g. http://host:8000)")
    return base


def _url_credentials(url: str) -> str | None:
    """The Authorization header for a URL's user:password@ (HTTP basic auth), or None."""
    userinfo = _split_userinfo(url)[0]
    if userinfo is None:
        return None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def key_from_env(var: str, flag: str, name: str = "") -> tuple[str, str]:
    """(the API key held by environment variable var, "$var": its source for messages) for the
    flag `flag [NAME=]VAR`. Refused, one line naming the variable: a name that is no variable name
    (perhaps the key itself, so not shown), a variable unset or empty."""
    given = f"{flag} {name + '=' if name else ''}"
    if not ENV_NAME.match(var):
        raise DadpoError(f"{given}VAR: give the name of the environment variable that holds the key (letters, digits "
                         "and _), not the key itself")
    key = os.environ.get(var)
    if not key:
        raise DadpoError(f"{given}{var}: the environment variable {var} is {'empty' if key == '' else 'not set'}")
    return key, f"${var}"


def check_server_flags(concurrency: int, timeout_s: float, retries: int, prefix: str = "--server") -> None:
    """PREFIX-concurrency, PREFIX-timeout, PREFIX-retries (--server-..., eval's --judge-...): one line
    for a value the client cannot use."""
    if concurrency < 1:
        raise DadpoError(f"{prefix}-concurrency {concurrency}: must be at least 1")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise DadpoError(f"{prefix}-timeout {timeout_s}: must be a positive number of seconds")
    if retries < 0:
        raise DadpoError(f"{prefix}-retries {retries}: must be at least 0")


def served_key(var: str, flag: str, name: str, url: str | None) -> tuple[str, str]:
    """key_from_env for `flag [NAME=]VAR`, refused when that model has no URL (is not served)."""
    if not url:
        served = flag.replace("-api-key-env", "-url") + (f" {name}=URL" if name else " URL")
        shown = var if ENV_NAME.match(var) else "VAR"  # perhaps the key itself: not shown
        raise DadpoError(f"{flag} {name + '=' if name else ''}{shown}: that model is not served (no {served})")
    return key_from_env(var, flag, name)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer stays an HTTPError: following it would send the key to wherever it points."""

    def redirect_request(self, *args, **kwargs):
        return None


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_message(body: bytes) -> str:
    """The message of a vLLM/OpenAI error body ({"error": {"message"}}, or FastAPI's {"detail"})."""
    try:
        data = json.loads(body)
    except ValueError:
        return one_line(body.decode("utf-8", "replace")) or "no message"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return one_line(error["message"])
        for key in ("message", "detail"):
            if key in data:
                return one_line(data[key])
    return one_line(body.decode("utf-8", "replace"))


class Http:
    """JSON over HTTP to one server, with timeouts and retries with exponential backoff.

    Retried: connection errors, timeouts, 5xx and 429 (busy, restarting, a proxy in between).
    Not retried: other 4xx (Refused), and a 200 whose body is not JSON (not a vLLM server).
    401/403 are one DadpoError naming the key's source; a 3xx is one DadpoError (not followed).

    url: the base URL; a user:password@ in it is sent as basic auth and never shown (self.url is
    redacted). where: how messages name the server's flag (e.g. "--teacher-url big").
    api_key: sent as `Authorization: Bearer` (a server started with --api-key); never printed.
    key_source: where the key came from, for messages ("$TEACHER_KEY"); without a key, the flag
    that would give one ("--teacher-api-key-env VAR"), named when the server asks for one."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, where: str,
                 api_key: str | None = None, key_source: str | None = None):
        self.url = normalize_url(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.where = where
        self.key_source = key_source
        self.has_key = api_key is not None
        self._headers = {"Content-Type": "application/json"}
        basic = _url_credentials(url)
        if api_key is not None and basic is not None:
            raise self.fail(f"both the URL's user:password@ and the key from {key_source or 'the key flag'} give "
                            "credentials; give one")
        if api_key is not None:
            api_key = api_key.strip()
            # http.client would quote a bad header value in its exception: refuse it without showing it
            if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
                raise self.fail(f"the key from {key_source or 'the key flag'} is empty or holds spaces, control "
                                "or non-ASCII characters")
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif basic is not None:
            self._headers["Authorization"] = basic
        self._opener = urllib.request.build_opener(_NoRedirects)

    def call(self, path: str, payload: dict | None = None, stop: threading.Event | None = None) -> Any:
        """GET path (payload None) or POST payload as JSON; the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        method = "GET" if payload is None else "POST"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    break  # another request already failed for good: give up quietly
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers)
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                try:
                    message = _error_message(exc.read())
                except (OSError, http.client.HTTPException):  # the error body itself was cut off
                    message = exc.reason or "no message"
                if exc.code == 429 or exc.code >= 500:
                    last_error = f"{exc.code}: {message}"
                    continue
                if exc.code in (401, 403):
                    raise self._refused_key(exc.code, message) from None
                if 300 <= exc.code < 400:
                    location = redact_url(exc.headers.get("Location") or "nowhere")
                    raise self.fail(f"{method} {path} answered a redirect ({exc.code} to {one_line(location)}); "
                                    "dadpo does not follow redirects (they could carry the key elsewhere): give the "
                                    "URL the server lives at") from None
                raise Refused(exc.code, message) from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP
                reason = getattr(exc, "reason", None) or exc
                last_error = one_line(f"{type(reason).__name__}: {reason}")
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise DadpoError(f"{self.where} {self.url}: {method} {path} answered with something that is not "
                                 f"JSON ({one_line(body[:80].decode('utf-8', 'replace'))!r}); is this a vLLM "
                                 "OpenAI-compatible server?") from None
        raise DadpoError(f"{self.where} {self.url}: {method} {path} failed after {attempt + 1} tries "
                         f"(last error: {last_error}); is the server running?")

    def _refused_key(self, status: int, message: str) -> DadpoError:
        if self.has_key:
            return self.fail(f"the server refused the key (from {self.key_source or 'the key flag'}; "
                             f"{status}: {message})")
        if "Authorization" in self._headers:
            return self.fail(f"the server refused the key (the URL's user:password@; {status}: {message})")
        hint = f": give it with {self.key_source}" if self.key_source else ""
        return self.fail(f"the server refused the key (none was given{hint}; {status}: {message})")

    def fail(self, what: str) -> DadpoError:
        return DadpoError(f"{self.where} {self.url}: {what}")


def run_concurrently(items: Sequence, call: Callable[[Any, threading.Event], Any],
                     on_done: Callable[[list[tuple[int, Any]]], None], *, concurrency: int, name: str,
                     poll: Callable[[], None] | None = None) -> None:
    """call(item, halt) for every item on up to `concurrency` threads; on_done([(index, result), ...])
    in the caller's thread with whatever finished since its last call, in completion order.

    The first exception raised by a call is raised here, after on_done has had the results that
    finished with it; `halt` is set then, so the other calls stop retrying (Http.call takes it).
    poll() (e.g. stop.raise_if_requested) runs every 0.2 s while waiting. Daemon threads, not a
    ThreadPoolExecutor: after Ctrl-C or an error the process can exit at once, without joining
    threads that wait on a slow server."""
    if not items:
        return
    work: queue.SimpleQueue = queue.SimpleQueue()
    for index, item in enumerate(items):
        work.put((index, item))
    answers: queue.SimpleQueue = queue.SimpleQueue()
    halt = threading.Event()

    def worker() -> None:
        while not halt.is_set():
            try:
                index, item = work.get_nowait()
            except queue.Empty:
                return
            try:
                answers.put((index, call(item, halt), None))
            except BaseException as exc:  # handed to the caller's thread, raised there
                answers.put((index, None, exc))
                return

    for _ in range(min(concurrency, len(items))):
        threading.Thread(target=worker, name=name, daemon=True).start()
    remaining = len(items)
    try:
        while remaining:
            try:
                batch = [answers.get(timeout=0.2 if poll else None)]
            except queue.Empty:
                poll()
                continue
            while True:  # whatever else finished meanwhile goes to the same on_done
                try:
                    batch.append(answers.get_nowait())
                except queue.Empty:
                    break
            done = [(index, result) for index, result, error in batch if error is None]
            remaining -= len(done)
            if done:
                on_done(done)
            for _, _, error in batch:
                if error is not None:
                    raise error
            if poll:
                poll()
    finally:
        halt.set()
