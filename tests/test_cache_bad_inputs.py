"""Every bad input to `dadpo cache-teacher`, through the real CLI: one line on stderr naming what
is wrong and where, a non-zero exit, no traceback, and nothing that looks like a finished cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support import ENV, REPO, assert_nothing_complete, assert_one_line_error, cache_args, run_cli, write_jsonl

GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def _jsonl(*rows):
    return lambda path: write_jsonl(path.with_suffix(".jsonl"), list(rows))


def _raw(suffix, data: bytes):
    def write(path):
        path = path.with_suffix(suffix)
        path.write_bytes(data)
        return path
    return write


def _parquet(table: pa.Table):
    def write(path):
        pq.write_table(table, path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    return write


BAD_PAIRS = {
    "missing column": (_jsonl({"prompt": "p", "chosen": "c"}), ["missing column 'rejected'", "found: prompt, chosen"]),
    "misnamed column": (_jsonl({"prompt": "p", "chosen": "c", "rejected_response": "r"}),
                        ["missing column 'rejected'", "did you mean 'rejected_response'"]),
    "null response": (_jsonl({"id": "a", **GOOD}, {"id": "b", "prompt": "p", "chosen": None, "rejected": "r"}),
                      ["line 2", "(id 'b')", "'chosen' is null"]),
    "empty response": (_jsonl({**GOOD, "rejected": ""}), ["line 1", "'rejected' is empty"]),
    "duplicate ids": (_jsonl({"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}),
                      ["duplicate id 'a'", "lines 1 and 3"]),
    "number as prompt": (_jsonl(GOOD, {**GOOD, "prompt": 42}), ["line 2", "'prompt' must be a string or a list",
                                                                 "got int"]),
    "number as prompt (parquet)": (_parquet(pa.table({"prompt": [1, 2], "chosen": ["c", "c"], "rejected": ["r", "r"]})),
                                   ["row 0", "'prompt' must be a string or a list", "got int"]),
    "content not a string": (_jsonl({**GOOD, "prompt": [{"role": "user", "content": ["hi"]}]}),
                             ["line 1", "message 0 'content' must be a string, got list"]),
    "response content not a string": (_jsonl({**GOOD, "chosen": [{"role": "assistant", "content": 7}]}),
                                      ["line 1", "'chosen' message 'content' must be a string, got int"]),
    "unknown role": (_jsonl({**GOOD, "prompt": [{"role": "robot", "content": "beep"}]}),
                     ["line 1", "unknown role 'robot'"]),
    "non-UTF-8 bytes": (_raw(".jsonl", json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "c", '
                             b'"rejected": "r"}\n'), ["line 2", "not valid UTF-8", "0xe9"]),
    "truncated JSON line": (_raw(".jsonl", (json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20]).encode()),
                            ["line 2", "not valid JSON", "the last line looks truncated"]),
    "empty file": (_raw(".jsonl", b""), ["the file is empty"]),
    "missing file": (lambda path: path.with_name("nope.jsonl"), ["nope.jsonl: no such file"]),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_pairs_file(models, tmp_path, case):
    write, fragments = BAD_PAIRS[case]
    pairs = write(tmp_path / "pairs")
    out = tmp_path / "cache"
    result = run_cli(*cache_args(pairs, models, out))
    assert_one_line_error(result, pairs.name, *fragments)
    assert not out.exists()  # refused before anything was written


BAD_FLAGS = {
    "unknown backend": (["--backend", "tensorrt"], ["--backend tensorrt", "unknown backend", "auto, hf, vllm"]),
    "worker index out of range": (["--num-workers", 2, "--worker-index", 2], ["--worker-index 2", "0..1"]),
    "shard size 0": (["--shard-size", 0], ["--shard-size 0", "at least 1"]),
    "unknown dtype": (["--dtype", "float8"], ["--dtype float8", "unknown dtype"]),
    "unknown on-overlong": (["--on-overlong", "truncate"], ["--on-overlong truncate", "drop or error"]),
    "max length over the models' limit": (["--max-length", 100000], ["--max-length 100000", "at most 512"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags(models, pairs_file, tmp_path, case):
    flags, fragments = BAD_FLAGS[case]
    out = tmp_path / "cache"
    result = run_cli(*cache_args(pairs_file, models, out), *map(str, flags))
    assert_one_line_error(result, *fragments)
    assert not out.exists()


# ---- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_models")
    # A chat template that refuses system turns (as Gemma 2's does); the pairs file has some.
    broken = shutil.copytree(models["student"], root / "broken_template")
    template = (broken / "chat_template.jinja").read_text()
    (broken / "chat_template.jinja").write_text("{%- if messages[0]['role'] == 'system' -%}"
                                                "{{- raise_exception('System role not supported') -}}{%- endif -%}"
                                                + template)
    no_tokenizer = shutil.copytree(models["teacher"], root / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink()
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "weights.txt").write_text("hello")
    # Real weights with NaN in the output head: every log-prob comes out NaN.
    from safetensors.torch import load_file, save_file

    nan_teacher = shutil.copytree(models["teacher"], root / "nan_teacher")
    weights = load_file(nan_teacher / "model.safetensors")
    weights["lm_head.weight"][5] = float("nan")
    save_file(weights, nan_teacher / "model.safetensors", metadata={"format": "pt"})
    return {"broken_template": broken, "no_tokenizer": no_tokenizer, "not_a_model": not_a_model,
            "nan_teacher": nan_teacher, "missing": root / "no_such_model"}


BAD_MODELS = {
    "template refusing a conversation": ("--reference", "broken_template",
                                         ["row id 'tiny-0-000", "--reference", "broken_template",
                                          "refuses this conversation", "TemplateError: System role not supported"]),
    "model path does not exist": ("--teacher", "missing", ["--teacher", "no_such_model: no such folder"]),
    "model folder without tokenizer": ("--teacher", "no_tokenizer", ["--teacher", "no tokenizer in"]),
    "folder that is not a model": ("--reference", "not_a_model", ["--reference", "has no config.json"]),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model(models, bad_models, pairs_file, tmp_path, case):
    flag, which, fragments = BAD_MODELS[case]
    args = cache_args(pairs_file, models, tmp_path / "cache")
    args[args.index(flag) + 1] = str(bad_models[which])
    result = run_cli(*args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_nan_scores_are_refused_and_nothing_is_cached(models, bad_models, tmp_path):
    """Real scoring of real (broken) weights; progress output on (no --quiet) must not reach stderr."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": f"p{i}", **GOOD} for i in range(6)])
    args = cache_args(pairs, models, tmp_path / "cache")
    args[args.index("--teacher") + 1] = str(bad_models["nan_teacher"])
    result = run_cli(*args)
    assert_one_line_error(result, "--teacher", "nan_teacher", "log-prob of the chosen response is nan",
                          "pairs.jsonl row id 'p0'", "shard 0", "the shard was not cached")
    assert_nothing_complete(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ---- the output folder -----------------------------------------------------------------------------


def test_out_is_a_file(models, pairs_file, tmp_path):
    target = tmp_path / "cache.txt"
    target.write_text("not a folder")
    result = run_cli(*cache_args(pairs_file, models, target))
    assert_one_line_error(result, f"--out {target}", "is a file")
    assert target.read_text() == "not a folder"


def test_out_holding_files_dadpo_did_not_make(models, pairs_file, tmp_path):
    """shards/ or work/ without a manifest are someone else's: refused, even with --overwrite."""
    out = tmp_path / "project"
    (out / "work").mkdir(parents=True)
    (out / "work" / "notes.txt").write_text("mine")
    result = run_cli(*cache_args(pairs_file, models, out, "--overwrite"))
    assert_one_line_error(result, f"--out {out}", "holds work/ but no manifest.json", "not a dadpo cache")
    assert (out / "work" / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["work"]


def test_unreadable_manifest(models, pairs_file, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "manifest.json").write_text('{"schema_version": 1, "pairs": ')
    result = run_cli(*cache_args(pairs_file, models, out))
    assert_one_line_error(result, "manifest.json: unreadable manifest", "choose another --out")


def _without_write_override() -> list[str]:
    """A command prefix that makes file permissions bind. We run as root, which ignores them:
    run root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv drops them from the
    bounding set, so the child never has them)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: root would ignore the permissions")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_out_without_write_permission(models, pairs_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = _without_write_override()
    probe = subprocess.run(prefix + [sys.executable, "-c", f"open({str(locked / 'x')!r}, 'w')"], capture_output=True)
    if probe.returncode == 0:
        (locked / "x").unlink()
        pytest.skip("this environment cannot deny writes to root (setpriv could not drop CAP_DAC_OVERRIDE)")
    for out in (locked, locked / "cache"):  # the folder itself, and a folder to be made in it
        result = subprocess.run(prefix + [sys.executable, "-m", "dadpo.cli.main", *cache_args(pairs_file, models, out)],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert_one_line_error(result, f"--out {out}", "cannot write there", "Permission denied")
    assert list(locked.iterdir()) == []
