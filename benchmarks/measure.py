"""What every benchmark here measures with: peak memory, the machine, ratios of interleaved timings,
and worker subprocesses that take turns.

Arms that must not share a process (an engine's threads, a peak-memory reading) run in Worker
subprocesses (spawned: a fresh interpreter each). The parent sends one request at a time and
waits for the answer, so the workers never compute at the same moment, and rotating which one
goes first spreads the load of other jobs on the machine over all arms alike.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MB, from /proc.
    getrusage's ru_maxrss would carry the parent's peak across fork + exec, and cannot be reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux: echo 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.node()}: {device}, {os.cpu_count()} CPU cores, load average {load}; torch {torch.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of per-round ratios: each round's arms ran back to back, so a round shares its load."""
    return statistics.median(x / y for x, y in zip(numerators, denominators))


class Timer:
    """Wall (perf_counter) and this process's CPU time (process_time) of a block. With one torch
    thread the work runs in this process, so CPU time is far less disturbed by other jobs."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _worker_entry(conn, target, args) -> None:
    """In the subprocess: run target(conn, *args); any exception goes to the parent as text.
    Ends with os._exit, so an engine's leftover threads cannot hold the process open."""
    try:
        target(conn, *args)
    except BaseException as exc:  # noqa: BLE001  (the parent prints it)
        import traceback

        try:
            conn.send(("error", "".join(traceback.format_exception(exc))))
        except Exception:
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Worker:
    """The parent's handle on one spawned subprocess running target(conn, *args).

    The target talks over `conn`: it answers each request it receives with one message, a tuple
    whose first item is a kind. call() sends a request and returns the answer, raising
    SystemExit with the worker's traceback when it sent ("error", text) or died."""

    def __init__(self, name: str, target, *args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_entry, args=(child, target, args))
        self.process.start()
        child.close()

    def receive(self, kind: str | None = None) -> tuple:
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(10)
            raise SystemExit(f"the {self.name} worker died (exit code {self.process.exitcode})") from None
        if message[0] == "error":
            raise SystemExit(f"the {self.name} worker failed:\n{message[1]}")
        if kind is not None and message[0] != kind:
            raise SystemExit(f"the {self.name} worker answered {message[0]!r}, expected {kind!r}")
        return message

    def call(self, *request, kind: str | None = None) -> tuple:
        self.conn.send(request)
        return self.receive(kind)

    def close(self, timeout: float = 120) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def preload(*modules: str) -> None:
    """Import these modules now: before a memory baseline (it then counts code, not data), and so
    that no timed arm pays for a first import."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def one_thread_env() -> dict:
    """Environment for timed subprocesses: one math thread, quiet libraries, nothing downloaded."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
