"""dadpo inspect on a real tiny cache (hf backend): counts, margin distributions, the PNG, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from support import assert_one_line_error, run_cli
from dadpo.cache import CacheTeacherConfig, cache_teacher
from dadpo.errors import DadpoError
from dadpo.inspect_cache import QUANTILES, format_report, inspect_cache, plot_histograms
from dadpo.engine import EngineOptions


@pytest.fixture(scope="module")
def cache_dir(models, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "cache"
    # max_length 120 drops the longest of the 40 pairs, so the dropped count is exercised
    cache_teacher(CacheTeacherConfig(pairs=str(pairs_file), teacher=str(models["teacher"]),
                                     reference=str(models["student"]), out=str(out), backend="hf", dtype="float32",
                                     max_length=120, shard_size=16, engine=EngineOptions(batch_size=16),
                                     progress=False))
    return out


@pytest.fixture(scope="module")
def shards(cache_dir) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((cache_dir / "shards").glob("*.parquet"))])


def test_counts_and_distributions_match_the_shards(cache_dir, shards):
    report = inspect_cache(cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert report.rows == shards.height == manifest["totals"]["rows"]
    assert report.dropped == manifest["totals"]["dropped"] > 0
    assert report.rows + report.dropped == report.pairs_in_source == 40
    assert report.tokens["teacher"]["chosen"] == shards["teacher_ntok_chosen"].sum()
    assert report.tokens["ref"]["rejected"] == shards["ref_ntok_rejected"].sum()
    h_te = (shards["teacher_logp_chosen"] - shards["teacher_logp_rejected"]).to_numpy()
    h_ref = (shards["ref_logp_chosen"] - shards["ref_logp_rejected"]).to_numpy()
    for name, values in (("h_te", h_te), ("h_ref", h_ref), ("d_te", h_te - h_ref)):
        d = report.margins[name]
        assert d.mean == pytest.approx(values.mean()) and d.sd == pytest.approx(values.std(ddof=1))
        assert d.quantiles[0.5] == pytest.approx(np.median(values))
        assert list(d.quantiles) == list(QUANTILES)


def test_text_report_and_png(cache_dir, tmp_path):
    report = inspect_cache(cache_dir)
    text = format_report(report)
    assert f"{report.rows} cached of 40" in text and f"{report.dropped} dropped" in text
    assert f"{report.margins['h_te'].mean:.3g}" in text
    png = plot_histograms(report, tmp_path / "plots" / "margins.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (400, 1500)  # 15 x 4 inches at 100 dpi


def test_cli_inspect(cache_dir, tmp_path):
    png = tmp_path / "m.png"
    result = run_cli("inspect", cache_dir, "--png", png)
    assert result.returncode == 0, result.stderr
    assert "h_te" in result.stdout and "d_te" in result.stdout and png.is_file()
    as_json = run_cli("inspect", cache_dir, "--json")
    payload = json.loads(as_json.stdout)
    assert payload["rows"] == inspect_cache(cache_dir).rows and "0.5" in payload["margins"]["h_ref"]["quantiles"]


def test_broken_caches_are_refused(cache_dir, tmp_path):
    assert_one_line_error(run_cli("inspect", tmp_path / "nothing"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("inspect", tmp_path / "empty"), "no manifest.json")
    damaged = tmp_path / "damaged"
    shutil.copytree(cache_dir, damaged)
    shard = sorted((damaged / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    with pytest.raises(DadpoError, match=shard.name):
        inspect_cache(damaged)
