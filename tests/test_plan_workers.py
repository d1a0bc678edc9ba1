"""cache-teacher's plan in forked worker processes (dadpo.cache.passes.plan_shards): the same token
files as one process, the first failing shard's error naming the file and row id, a stop signal or
Ctrl-C ending the plan after the shard in flight with one line and no traceback, and no worker that
outlives the plan."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import polars as pl
import pytest

from dadpo import stop
from dadpo.cache.passes import PLAN_COLUMNS, plan_shards
from dadpo.errors import DadpoError
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.pairs import load_pairs
from dadpo.stop import EXIT_STOPPED
from dadpo.tiny import make_tiny_pairs
from support import REPO, cache_args, signal_when, write_jsonl

SHARD = 8
FLAGS = {"teacher": "--teacher", "ref": "--reference"}


@pytest.fixture(scope="module")
def tokenizers(models):
    return {"teacher": model_tokenizer(resolve_model(str(models["teacher"])), "--teacher"),
            "ref": model_tokenizer(resolve_model(str(models["student"])), "--reference")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan-pairs")
    return load_pairs(write_jsonl(folder / "pairs.jsonl", make_tiny_pairs(48, seed=0)), workdir=folder)


def _reader(pairs):
    def read_rows(k: int) -> list[dict]:
        rows = pairs.slice(k * SHARD, SHARD)
        return rows.with_columns(pl.int_range(k * SHARD, k * SHARD + rows.height, dtype=pl.Int64)
                                 .alias("pair_index")).select(PLAN_COLUMNS).to_dicts()
    return read_rows


def _plan(pairs, tokenizers, workers, shards=range(6), max_length=None, on_overlong="drop", write=None):
    written = {}
    plan_shards(list(shards), _reader(pairs), write or (lambda k, planned: written.update({k: planned.table()})),
                tokenizers, FLAGS, max_length, on_overlong, "pairs.jsonl", workers)
    return written


def test_workers_write_what_one_process_writes_in_shard_order(pairs, tokenizers):
    order = []
    one = _plan(pairs, tokenizers, 1)
    _plan(pairs, tokenizers, 3, write=lambda k, planned: order.append((k, planned.table())))
    assert [k for k, _ in order] == list(range(6))
    assert all(table.equals(one[k]) for k, table in order)
    assert one[0].column_names == ["pair_index", "id"] + [f"{prefix}_{part}_ids" for prefix in ("teacher", "ref")
                                                         for part in ("prompt", "chosen", "rejected")]
    assert str(one[0].schema.field("ref_prompt_ids").type) == "list<item: int32>"
    assert not multiprocessing.active_children()  # the workers are gone


def test_the_first_failing_shard_raises_its_error_naming_file_and_row(pairs, tokenizers):
    """on_overlong=error: every pair is over 8 tokens, so every shard fails; shard 0's error comes
    first, as in one process, and nothing after it is written."""
    written = []
    with pytest.raises(DadpoError, match=r"pairs\.jsonl row id '[^']+'") as error:
        _plan(pairs, tokenizers, 3, max_length=8, on_overlong="error",
              write=lambda k, planned: written.append(k))
    assert pairs.read()["id"][0] in str(error.value)
    assert written == [] and not multiprocessing.active_children()


def test_a_stop_signal_ends_the_plan_after_the_shard_in_flight(pairs, tokenizers):
    written = []

    def write(k, planned):
        written.append(k)
        if k == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, with stop's handler in place

    try:
        with stop.handling(), pytest.raises(stop.Stopped) as stopped:
            _plan(pairs, tokenizers, 2, write=write)
    finally:
        stop.reset()
    assert str(stopped.value) == ("stopped by SIGTERM while tokenizing the pairs (2 of 6 shards): nothing was cached "
                                  "yet: re-run the same command to plan again")
    assert written == [0, 1] and not multiprocessing.active_children()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_mid_plan_is_one_line(models, tmp_path, signal_number):
    """SLURM's SIGTERM and a terminal's Ctrl-C reach every process of the group, the plan's workers
    too: the command stops with one line (exit 75, or 130 for Ctrl-C), no traceback from any
    process, nothing left under --out, and no worker left running."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(2000, seed=1))
    out = tmp_path / "cache"
    args = cache_args(pairs, models, out, "--plan-only", "--plan-workers", 2, "--quiet")
    process = subprocess.Popen([sys.executable, "-m", "dadpo.cli.main", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    group = process.pid  # its own session: the group holds the command and its workers alone

    class Group:
        def send_signal(self, number):
            os.killpg(group, number)

        def __getattr__(self, name):
            return getattr(process, name)

    def planning() -> bool:  # the first shard of the plan is in the scratch folder
        return any(out.glob(".plan.*.tmp/work/tokens/*.parquet"))

    assert signal_when(Group(), planning, signal_number)
    stdout, stderr = process.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == (EXIT_STOPPED if signal_number == signal.SIGTERM else 130), stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert ("while tokenizing the pairs" if signal_number == signal.SIGTERM else "interrupted") in lines[0]
    assert not out.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing of the group is left
