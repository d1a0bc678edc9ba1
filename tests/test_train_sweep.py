"""`dadpo sweep`: a 2 x 2 (beta1, beta2) grid from one cache, with the teacher and reference
model folders deleted after caching."""

from __future__ import annotations

import json
import shutil
import signal

import polars as pl
import pytest

from dadpo.errors import DadpoError
from dadpo.sweep import run_sweep
from dadpo.recipes.dadpo import TrainConfig, train
from dadpo.training.checkpoint import list_checkpoints
from support import (ENV, assert_one_line_error, assert_same_steps, cli_flags, metrics, run_cli, start_cli,
                     stop_line_after_steps)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def orphan_cache(models, pairs_file, tmp_path_factory):
    """A cache whose teacher and reference folders no longer exist; the student survives elsewhere."""
    root = tmp_path_factory.mktemp("sweep")
    for name in ("teacher", "student"):
        shutil.copytree(models[name], root / name)
    shutil.copytree(models["student"], root / "student-kept")
    result = run_cli("cache-teacher", "--pairs", pairs_file, "--teacher", root / "teacher", "--reference",
                     root / "student", "--out", root / "cache", "--backend", "hf", "--dtype", "float32", "--quiet",
                     env=ENV)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(root / "teacher")
    shutil.rmtree(root / "student")
    return root


SWEEP = ["--beta1", "0,0.1", "--beta2", "0,0.01", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "1",
         "--max-steps", "2", "--eval-fraction", "0.1", "--quiet"]


def test_sweep_without_model_names_the_missing_reference(orphan_cache):
    result = run_cli("sweep", "--cache", orphan_cache / "cache", "--out", orphan_cache / "no-runs", *SWEEP, env=ENV)
    line = assert_one_line_error(result, "--model not given", "cache's reference", str(orphan_cache / "student"),
                                 "pass --model")
    assert "no such folder" in line
    assert not (orphan_cache / "no-runs").exists()


def test_two_by_two_sweep_from_the_cache_alone(orphan_cache):
    runs = orphan_cache / "runs"
    args = ["sweep", "--cache", orphan_cache / "cache", "--out", runs, "--model", orphan_cache / "student-kept", *SWEEP]
    result = run_cli(*args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "b1=0_b2=0 (-): skipped, beta1 = beta2 = 0" in result.stdout

    trained = {"b1=0_b2=0.01": "rDPO", "b1=0.1_b2=0": "dDPO", "b1=0.1_b2=0.01": "daDPO"}
    for name in trained:
        assert [s["step"] for s in metrics(runs / name)] == [1, 2]
        assert (runs / name / "model" / "model.safetensors").is_file() and (runs / name / "summary.json").is_file()
        config = json.loads((runs / name / "train_config.json").read_text())
        assert f"b1={config['beta1']:g}_b2={config['beta2']:g}" == name
    assert not (runs / "b1=0_b2=0").exists()

    table = pl.read_csv(runs / "summary.csv")
    assert table.height == 4 and table.columns[:3] == ["beta1", "beta2", "method"]
    for row in table.iter_rows(named=True):
        name = f"b1={row['beta1']:g}_b2={row['beta2']:g}"
        if name in trained:
            assert row["method"] == trained[name] and row["status"] == "trained"
            assert row["eval_loss"] == pytest.approx(json.loads((runs / name / "eval.json").read_text())["eval_loss"])
            assert row["final_loss"] == pytest.approx(metrics(runs / name)[-1]["loss"])
        else:
            assert row["status"].startswith("skipped") and row["eval_loss"] is None
    markdown = (runs / "summary.md").read_text()
    assert markdown.startswith("| beta1 | beta2 | method | eval loss") and "Lowest eval loss" in markdown
    from matplotlib.image import imread

    assert imread(runs / "summary.png").shape[2] == 4

    # Re-run: finished points are skipped (nothing rewritten), the summary is rebuilt.
    before = {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in trained}
    again = run_cli(*args, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 3
    assert before == {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in trained}
    assert pl.read_csv(runs / "summary.csv")["status"].to_list().count("finished earlier") == 3

    # A point left half written (killed while writing its summary, no checkpoints): trained again.
    half = sorted(trained)[0]
    (runs / half / "summary.json").write_text('{"steps": 2, "final_tr')
    again = run_cli(*args, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2 and f"training -> {runs / half}" in again.stdout
    assert json.loads((runs / half / "summary.json").read_text())["steps"] == 2

    # Same folder, other settings: refused before anything is trained.
    changed = TrainConfig(cache=str(orphan_cache / "cache"), out=str(runs), model=str(orphan_cache / "student-kept"),
                          lr=2e-3, batch_size=4, grad_accum=1, max_steps=2, eval_fraction=0.1, progress=False)
    with pytest.raises(DadpoError, match=r"b1=0_b2=0.01: finished earlier with other settings \(lr: 0.001 before, 0.002 now\)"):
        run_sweep(changed, [0.0, 0.1], [0.0, 0.01], say=lambda line: None)
    changed.lr, changed.batch_size = 1e-3, 2  # another global batch is another run too
    with pytest.raises(DadpoError, match=r"global_batch: 4 before, 2 now"):
        run_sweep(changed, [0.0, 0.1], [0.0, 0.01], say=lambda line: None)


def test_bad_beta_list(orphan_cache):
    result = run_cli("sweep", "--cache", orphan_cache / "cache", "--out", orphan_cache / "x", "--beta1", "0.1,abc")
    assert_one_line_error(result, "--beta1 0.1,abc", "'abc' is not a number")


def test_a_stop_signal_mid_sweep_saves_the_point_and_the_rerun_resumes_it_exactly(orphan_cache, tmp_path):
    """SIGTERM while the first of two points trains: that point's step in flight is checkpointed, one
    line says to re-run the sweep (it has no --resume), exit 75; the re-run resumes the point and
    trains the next, each logging the steps of an uninterrupted `train` of it."""
    runs = tmp_path / "runs"
    settings = dict(lr=1e-3, batch_size=2, grad_accum=1, max_steps=6, save_every=4, eval_fraction=0.1, seed=3)
    args = ["sweep", "--cache", orphan_cache / "cache", "--out", runs, "--model", orphan_cache / "student-kept",
            "--beta1", "0.1", "--beta2", "0,0.01", "--quiet", *cli_flags(settings)]
    first = runs / "b1=0.1_b2=0"
    line = stop_line_after_steps(start_cli(*args, env=ENV), first, 2, signal.SIGTERM)
    assert "[1/2] b1=0.1_b2=0" in line and "stopped by SIGTERM" in line, line
    assert "re-run the same sweep command" in line and "--resume" not in line
    done = len(metrics(first))
    assert 2 <= done < 6 and list_checkpoints(first)[-1].name == f"step-{done:06d}"
    assert not (first / "summary.json").exists() and not (runs / "b1=0.1_b2=0.01").exists()

    again = run_cli(*args, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming -> {first}" in again.stdout and f"training -> {runs / 'b1=0.1_b2=0.01'}" in again.stdout
    for beta2 in (0.0, 0.01):
        name = f"b1=0.1_b2={beta2:g}"
        whole = tmp_path / f"whole-{name}"
        train(TrainConfig(cache=str(orphan_cache / "cache"), out=str(whole), model=str(orphan_cache / "student-kept"),
                          beta1=0.1, beta2=beta2, progress=False, **settings))
        assert_same_steps(metrics(runs / name), metrics(whole), keys=("loss", "margin", "lr", "grad_norm"),
                          tolerance=1e-6)
