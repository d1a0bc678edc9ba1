"""Model code runs only with --trust-remote-code; dadpo's own files are never pickles.
(The manifest's shard paths staying inside the cache is tested in test_cache_guard.py, the
absence of pickles in a real cache and run folder in test_cache_resume.py.)"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from support import cache_args
from support import REPO, assert_one_line_error, run_cli, write_jsonl

CUSTOM_CODE = '''
import os, pathlib
pathlib.Path(os.environ["DADPO_TEST_MARKER"]).write_text("custom code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


@pytest.fixture(scope="module")
def remote_code_model(models, tmp_path_factory):
    """The tiny teacher, repackaged as a model whose config needs its own Python file."""
    folder = shutil.copytree(models["teacher"], tmp_path_factory.mktemp("remote") / "custom_teacher")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE)
    return folder


def _run(models, remote_code_model, tmp_path, *flags):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": "no"}
                                                   for i in range(4)])
    args = cache_args(pairs, models, tmp_path / "cache", "--quiet", *flags)
    args[args.index("--teacher") + 1] = str(remote_code_model)
    marker = tmp_path / "marker"
    env = {"DADPO_TEST_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return run_cli(*args, env=env), marker


def test_model_code_is_refused_without_trust_remote_code(models, remote_code_model, tmp_path):
    result, marker = _run(models, remote_code_model, tmp_path)
    assert_one_line_error(result, "--teacher", "custom_teacher", "ships its own code", "auto_map",
                          "only if you pass --trust-remote-code")
    assert not marker.exists()  # the model's Python file was never imported
    assert not (tmp_path / "cache").exists()


def test_trust_remote_code_reaches_the_model_loader(models, remote_code_model, tmp_path):
    result, marker = _run(models, remote_code_model, tmp_path, "--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "custom code ran"
    assert "4 pairs cached" in result.stdout and "complete" in result.stdout


def test_dadpo_never_writes_pickles():
    """Checkpoints are safetensors, caches Parquet, the rest JSON: no pickle-based file writer in the
    code. (Pickling in memory, to hand results between processes, writes no file and is allowed.)"""
    pattern = re.compile(r"\bpickle\.dump\(|\btorch\.save\(|\bsafe_serialization\s*=\s*False|\bdill\.dump|"
                         r"\bjoblib\.dump|\bcloudpickle\.dump\(")
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for folder in ("dadpo", "cli") for path in sorted((REPO / folder).rglob("*.py"))
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
