"""Helpers shared by the cache-teacher tests (resume, workers, guard, bad inputs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from conftest import REPO, kill_when, start_cli  # noqa: F401  (re-exported for the cache tests)

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


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
    return found + (["work/"] if (root / "work").exists() else [])


def assert_same_cache(cache_dir: Path, clean_dir: Path) -> None:
    """Same rows, same ids in the same order, bit-identical values, same manifest entries."""
    got, want = json.loads((cache_dir / "manifest.json").read_text()), json.loads((clean_dir / "manifest.json").read_text())
    assert got["complete"] and got["totals"] == want["totals"]
    assert got["shards"] == want["shards"]  # rows, pair ranges, dropped ids, sha256 of every file
    rows, clean_rows = shard_rows(cache_dir), shard_rows(clean_dir)
    assert rows["id"].n_unique() == rows.height  # no pair twice
    assert rows.equals(clean_rows)  # floats compared exactly
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
