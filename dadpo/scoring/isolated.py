"""Run one function in a fresh (spawned) process and hand its result back.

vLLM work runs this way: each engine lives and dies with its own process, so its memory (device
and host) is fully released before the next model loads, and nothing of one engine's torch or
CUDA state leaks into the next.

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
import traceback
from typing import Any, Callable

from dadpo.errors import DadpoError

# After the child's result arrives it only has to flush and _exit; a stuck child is killed.
_EXIT_GRACE_S = 30.0


def call_isolated(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs) in a spawned process; its return value, or its exception re-raised.

    function, its arguments and its result must pickle (a module-level function, dataclasses,
    numpy arrays, ...). Any script that calls this needs an `if __name__ == "__main__":` guard.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args, kwargs), name="dadpo-isolated")
    process.start()
    sender.close()  # the parent keeps only the reading end, so a dead child shows as EOF
    try:
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"{_name(function)}: its subprocess died with exit code {process.exitcode} "
                               "before returning a result") from None
    finally:
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
