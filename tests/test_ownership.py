"""dadpo never deletes what it did not write: a non-empty output it did not make is refused, whole
and untouched, and nothing a command reads is removed with an output's old contents. Every case
runs the real command as a subprocess, the way a user meets it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dadpo.errors import DadpoError
from dadpo.ownership import ensure_owned

from support import ENV, assert_one_line_error, run_cli, write_jsonl

TRAIN = ["--batch-size", 2, "--grad-accum", 1, "--max-steps", 1, "--eval-fraction", 0, "--quiet"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) with the sha256 of its bytes: what 'untouched' means."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def someone_elses_folder(path: Path) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return path


@pytest.fixture(scope="module")
def finished_run(cache_dir, models, tmp_path_factory) -> Path:
    """A real finished `dadpo train` run: RUN/train_config.json, RUN/model, RUN/summary.json."""
    run = tmp_path_factory.mktemp("owned") / "run"
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", run, *TRAIN, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "model" / "config.json").is_file() and (run / "summary.json").is_file()
    return run


# ---------------------------------------------------------------- train, sft, sweep --out


def test_train_refuses_a_folder_it_did_not_make(cache_dir, models, tmp_path):
    out = someone_elses_folder(tmp_path / "project")
    before = snapshot(out)
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", out, *TRAIN, env=ENV)
    assert_one_line_error(result, f"--out {out}", "holds data/ and notes.txt but no train_config.json",
                          "not a dadpo training run")
    assert snapshot(out) == before


def test_sft_refuses_a_folder_it_did_not_make(pairs_file, models, tmp_path):
    out = someone_elses_folder(tmp_path / "project")
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"mine")
    before = snapshot(out)
    result = run_cli("sft", "--pairs", pairs_file, "--model", models["student"], "--out", out, *TRAIN, env=ENV)
    assert_one_line_error(result, f"--out {out}", "but no train_config.json", "not a dadpo training run")
    assert snapshot(out) == before


def test_a_run_never_deletes_the_model_it_trains(finished_run, cache_dir, pairs_file):
    """--model RUN/model --out RUN: clearing RUN's old final model would delete the model to train."""
    before = snapshot(finished_run)
    model = finished_run / "model"
    for command in (["train", "--cache", cache_dir], ["sft", "--pairs", pairs_file]):
        result = run_cli(*command, "--model", model, "--out", finished_run, *TRAIN, env=ENV)
        assert_one_line_error(result, f"--out {finished_run}", f"would remove {model}", f"holds --model {model}")
        assert snapshot(finished_run) == before, command[0]


def test_a_damaged_run_record_is_not_dadpos(finished_run, cache_dir, models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text('{"lr": 0.1}')  # a JSON object, but not a run's record
    (run / "model").mkdir()
    (run / "model" / "keep.txt").write_text("mine")
    result = run_cli("train", "--cache", cache_dir, "--model", models["student_b"], "--out", run, *TRAIN, env=ENV)
    assert_one_line_error(result, f"--out {run}", "its train_config.json does not read as dadpo's")
    assert (run / "model" / "keep.txt").read_text() == "mine"


def test_a_finished_run_is_trained_again_in_place(finished_run, cache_dir, models, tmp_path):
    """The folder dadpo made stays dadpo's to clear: a fresh run over it (--overwrite) works."""
    run = tmp_path / "again"
    shutil.copytree(finished_run, run)
    result = run_cli("train", "--cache", cache_dir, "--model", models["student"], "--out", run, "--overwrite", *TRAIN,
                     env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "train_config.json").read_text())["model"] == str(models["student"])


def test_sweep_refuses_a_folder_it_did_not_make_and_marks_its_own(cache_dir, models, tmp_path):
    args = ["--cache", cache_dir, "--model", models["student_b"], "--beta1", "0.1", "--beta2", "0", *TRAIN]
    out = someone_elses_folder(tmp_path / "project")
    before = snapshot(out)
    result = run_cli("sweep", "--out", out, *args, env=ENV)
    assert_one_line_error(result, f"--out {out}", "but no sweep.json", "not a dadpo sweep folder")
    assert snapshot(out) == before

    runs = tmp_path / "runs"
    result = run_cli("sweep", "--out", runs, *args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((runs / "sweep.json").read_text())["made_by"] == "dadpo sweep"
    again = run_cli("sweep", "--out", runs, *args, env=ENV)  # its own folder: the finished point is skipped
    assert again.returncode == 0 and "finished earlier, skipped" in again.stdout, again.stderr[-3000:]


# ---------------------------------------------------------------- cache-teacher --overwrite


def cache_args(pairs_file, models, out, *extra):
    return ["cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"], "--reference", models["student"],
            "--out", out, "--backend", "hf", "--dtype", "float32", "--shard-size", "16", "--quiet", *extra]


@pytest.mark.parametrize("manifest", ['{"name": "my project", "version": 3}', '{"schema_version": 2, "pairs": '])
def test_cache_overwrite_refuses_a_manifest_that_is_not_dadpos(pairs_file, models, tmp_path, manifest):
    out = tmp_path / "project"
    for name in ("work", "shards"):
        (out / name).mkdir(parents=True)
        (out / name / "results.parquet").write_bytes(b"my results")
    (out / "manifest.json").write_text(manifest)
    before = snapshot(out)
    result = run_cli(*cache_args(pairs_file, models, out, "--overwrite"), env=ENV)
    assert_one_line_error(result, f"--out {out}", "its manifest.json does not read as dadpo's", "not a dadpo cache")
    assert snapshot(out) == before


def test_cache_overwrite_never_removes_the_pairs_it_reads(pairs_file, models, tmp_path):
    """--pairs CACHE/work/pairs.jsonl --out CACHE --overwrite would delete its own input."""
    out = tmp_path / "cache"
    result = run_cli(*cache_args(pairs_file, models, out), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    inside = out / "work" / "mine" / "pairs.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(pairs_file.read_bytes())
    before = snapshot(out)
    result = run_cli(*cache_args(inside, models, out, "--overwrite"), env=ENV)
    assert_one_line_error(result, f"--out {out}", f"would remove {out / 'work'}", f"holds --pairs {inside}")
    assert snapshot(out) == before
    # nor the teacher it scores with (NAME=FOLDER, as --teacher may name it)
    teacher_inside = out / "work" / "teacher"
    shutil.copytree(models["teacher"], teacher_inside)
    before = snapshot(out)
    args = cache_args(pairs_file, models, out, "--overwrite")
    args[args.index(models["teacher"])] = f"big={teacher_inside}"
    result = run_cli(*args, env=ENV)
    assert_one_line_error(result, f"--out {out}", f"would remove {out / 'work'}", f"holds --teacher {teacher_inside}")
    assert snapshot(out) == before


# ---------------------------------------------------------------- generate --overwrite


def generate_args(prompts, models, out, *extra):
    return ["generate", "--prompts", prompts, "--teacher", models["teacher"], "--student", models["student"],
            "--out", out, "--backend", "hf", "--max-new-tokens", 4, "--quiet", *extra]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Hi"}, {"id": "b", "prompt": "Why?"}])


def test_generate_overwrite_refuses_a_file_it_did_not_make(prompts, models, tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"my": "data"}\n')
    table = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), table)
    for out, why in ((jsonl, "exists but has no mine.jsonl.generate.json"), (table, "it does not read as dadpo's")):
        before = snapshot(tmp_path)
        result = run_cli(*generate_args(prompts, models, out, "--overwrite"), env=ENV)
        assert_one_line_error(result, f"--out {out}", why, "not a dadpo generate output")
        assert snapshot(tmp_path) == before


def test_generate_overwrite_refuses_work_it_did_not_make(prompts, models, tmp_path):
    out = tmp_path / "pairs.jsonl"
    work = someone_elses_folder(tmp_path / "pairs.jsonl.work")
    before = snapshot(tmp_path)
    result = run_cli(*generate_args(prompts, models, out, "--overwrite"), env=ENV)
    assert_one_line_error(result, f"--out {work}", "but no settings.json", "not dadpo generate's unfinished work")
    assert snapshot(tmp_path) == before


def test_generate_overwrite_replaces_its_own_output(prompts, models, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run_cli(*generate_args(prompts, models, out), env=ENV).returncode == 0
    result = run_cli(*generate_args(prompts, models, out, "--overwrite", "--seed", 7), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "pairs.jsonl.generate.json").read_text())["sampling"]["seed"] == 7


# ---------------------------------------------------------------- the mechanism itself


def test_ensure_owned_protects_what_a_run_reads_through_a_link(tmp_path):
    """A protected path reached through a symlink is still protected (paths are compared resolved)."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(out / "model")
    with pytest.raises(DadpoError, match="would remove"):
        ensure_owned(out, flag="--out", what="a run", marker="train_config.json", removes=["model"],
                     protected={"--model": link})
    ensure_owned(out, flag="--out", what="a run", marker="train_config.json", removes=["adapter"],
                 protected={"--model": link})  # what it removes does not hold the model: allowed
    ensure_owned(tmp_path / "new", flag="--out", what="a run", marker="train_config.json", removes=["model"])
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".lock").write_text("")  # dadpo's own bookkeeping does not make a folder someone's
    ensure_owned(tmp_path / "hidden", flag="--out", what="a run", marker="train_config.json")
