"""The pass runner shared by `dadpo generate` and `dadpo cache-teacher`: each model in its own pass,
one after the other, never two in memory; with vLLM each pass in a fresh (spawned) process.

Each engine then lives and dies with its own process, so its memory (device and host) is fully
released before the next model loads, and nothing of one engine's torch or CUDA state leaks into
the next. A pass works through units (shards, chunks) and publishes each one whole, so a stop
signal, a crash or a kill loses at most the unit in flight.

The child ends with os._exit(0) once its result is sent. vLLM 0.32 sometimes aborts during
interpreter teardown, after all work is done ("terminate called without an active exception",
exit code 134; seen in about 1 run in 8 on CPU); skipping teardown avoids that, and by then the
result is already with the parent. The function must release what it holds (e.g. close its
scorer in a `finally`) before returning.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import time
import traceback
from typing import Any, Callable

from dadpo import stop
from dadpo.errors import DadpoError

# After the child's result arrives it only has to flush and _exit; a stuck child is killed.
_EXIT_GRACE_S = 30.0


class SubprocessDied(DadpoError):
    """An isolated pass's process ended without a result (killed, out of memory, a crash in native
    code): one line naming the pass and how the process ended."""


def call_isolated(function: Callable[..., Any], *args: Any, what: str | None = None, **kwargs: Any) -> Any:
    """function(*args, **kwargs) in a spawned process; its return value, or its exception re-raised.
    A process that dies without a result raises SubprocessDied naming `what` (e.g. "the teacher pass
    (--teacher M)"; default: the function's name).

    function, its arguments and its result must pickle (a module-level function, dataclasses,
    numpy arrays, ...). Any script that calls this needs an `if __name__ == "__main__":` guard.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args, kwargs), name="dadpo-isolated")
    process.start()
    sender.close()  # the parent keeps only the reading end, so a dead child shows as EOF
    stop.forward_to(process.pid)  # a stop signal to this process reaches the child too
    try:
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join()
            code = process.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            raise SubprocessDied(f"{what or _name(function)}: its process {how} before finishing (out of memory, a "
                                 "kill or a crash in the engine); finished units are kept: re-run the same command "
                                 "to continue") from None
    finally:
        stop.forward_to(None)
        receiver.close()
        process.join(_EXIT_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "error":
        raise payload
    return payload


def _name(function: Callable) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def _child(sender, function, args, kwargs) -> None:
    stop.install()
    try:
        message = ("ok", function(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001  (everything goes back to the parent)
        message = ("error", _portable(exc))
    try:
        sender.send(message)
    except Exception as exc:  # e.g. an unpicklable result
        sender.send(("error", RuntimeError(f"{_name(function)}: cannot return its result ({exc})")))
    finally:
        sender.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles; else a RuntimeError carrying its text. Unexpected
    errors keep the child's traceback (as a note) so a crash stays debuggable from the parent."""
    if not isinstance(exc, (DadpoError, KeyboardInterrupt)):
        trace = "".join(traceback.format_exception(exc))
        try:
            exc.add_note(f"in the isolated subprocess:\n{trace}")
        except Exception:
            pass
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_passes(function: Callable[[Any], dict], jobs: list, isolated: Callable[[Any], bool]) -> dict[str, dict]:
    """function(job) for each job (each has a .role), one after the other, in a fresh process where
    isolated(job); returns {role: the stats the pass returned}. Stops after the pass in flight when
    a stop signal came (dadpo.stop), raising stop.Stopped."""
    stats = {}
    for job in jobs:
        try:
            stats[job.role] = call_isolated(function, job, what=_pass_name(job)) if isolated(job) else function(job)
        except Exception:
            # a stop signal to the whole process group can kill an engine mid-unit; that unit was
            # abandoned unpublished, so this is a stop, not a failure
            stop.raise_if_requested()
            raise
        stop.raise_if_requested()
    return stats


def _pass_name(job) -> str:
    """'the teacher pass (M)': the pass's role and, where the job names one, its model."""
    model = getattr(job, "model", None) or getattr(getattr(job, "side", None), "name", None)
    name = getattr(model, "name", model)
    return f"the {job.role} pass" + (f" ({name})" if name else "")


class Progress:
    """A tqdm bar on an interactive terminal; elsewhere (logs, SLURM, pipes) a plain line on stdout
    at most every 30 s, so log files stay readable and stderr stays for errors."""

    def __init__(self, desc: str, total_units: int, unit: str, enabled: bool):
        self.desc, self.total_units, self.unit, self.done, self.count = desc, total_units, unit, 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr, mininterval=1.0)

    def tokens(self, count: int) -> None:
        self.count += count
        if self.bar is not None:
            self.bar.update(count)

    def unit_done(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.lines and now - self.last_line >= 30:
            self.last_line = now
            rate = self.count / max(now - self.started, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total_units} {self.unit}s done, {rate:.0f} tok/s", flush=True)

    def each(self, units: list):
        """The pass's units one at a time; after each, the progress line, and a stop signal ends the
        pass there (the unit in flight is finished and published first; the re-run does the rest)."""
        for unit in units:
            yield unit
            self.unit_done()
            if stop.requested():
                return

    def stats(self, tokens: int) -> dict:
        seconds = time.monotonic() - self.started
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
