"""Which process works as worker I of N on a cache folder: at most one at a time.

A worker claims CACHE/.claims/worker-I-of-N.json (created exclusively) with its host and pid, and
refreshes it every HEARTBEAT_S seconds while it runs. A second process started with the same
--worker-index refuses, naming the first (host, pid). A claim is stale, and taken over, when its
process is gone (same host) or it has not been refreshed for STALE_S seconds (another host, where
the pid cannot be checked), so a re-run after a crash or a kill -9 is never blocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from dadpo.atomic import write_json_atomic
from dadpo.cache.layout import CLAIMS_DIR
from dadpo.cache.manifest import locked
from dadpo.errors import DadpoError

HEARTBEAT_S = 30.0
STALE_S = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(claim: dict, age_s: float) -> bool:
    if claim.get("host") == socket.gethostname():
        return not _alive(int(claim.get("pid", -1)))
    return age_s > STALE_S


@contextlib.contextmanager
def worker_claim(cache_dir: Path, worker_index: int, num_workers: int):
    """Hold the claim on worker `worker_index` of `num_workers` for the block; refuse a live duplicate."""
    folder = Path(cache_dir) / CLAIMS_DIR
    path = folder / f"worker-{worker_index}-of-{num_workers}.json"
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    folder.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir):  # one taker at a time, also of a stale claim
        try:
            claim = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime  # wall clock on purpose: compared with another host's mtime
        except (OSError, ValueError):
            claim, age = None, 0.0
        if claim is not None and claim.get("pid") != os.getpid() and not _stale(claim, age):
            raise DadpoError(f"--worker-index {worker_index}: worker {worker_index} of {num_workers} is already running "
                             f"on {cache_dir} (host {claim.get('host')}, pid {claim.get('pid')}, since "
                             f"{claim.get('started')}); give each process its own --worker-index")
        write_json_atomic(path, mine)
    done = threading.Event()

    def heartbeat():
        while not done.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    beat = threading.Thread(target=heartbeat, name="dadpo-claim", daemon=True)
    beat.start()
    try:
        yield
    finally:
        done.set()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when no other worker holds a claim
