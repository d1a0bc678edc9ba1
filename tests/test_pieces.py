"""The pieces a run is made of, tested directly: which rows each step trains on, the learning-rate
schedule, the run log and folder, checkpoints (saved, damaged, restored), and the cache manifest."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from dadpo.cache.manifest import (check_shard_entries, differences, forget_shard, model_records, new_manifest,
                                  read_manifest, record_shard, reuse_identity)
from dadpo.config import TrainConfig
from dadpo.errors import DadpoError
from dadpo.training import checkpoint as ckpt
from dadpo.training.config import run_differences
from dadpo.training.data import global_batch_rows, process_rows, split_eval
from dadpo.training.run_folder import RunFolder
from dadpo.training.runlog import RunLog
from dadpo.training.trainer import lr_factor


def rows(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"pair-{i}" for i in range(n)], "x": list(range(n))})


# ---------------------------------------------------------------- which rows each step trains on


def test_the_eval_split_depends_on_the_id_alone():
    train, held = split_eval(rows(2000), 0.1)
    assert train.height + held.height == 2000 and 150 < held.height < 250
    # the same ids are held out from any subset, in any order: stable across runs and shard layouts
    subset = rows(2000).sample(fraction=0.3, seed=1, shuffle=True)
    _, held_subset = split_eval(subset, 0.1)
    assert set(held_subset["id"]) == set(held["id"]) & set(subset["id"])


def test_each_epoch_is_a_seeded_permutation_cut_into_global_batches():
    data = rows(20)
    epoch0 = [global_batch_rows(data, step, 6, 3, seed=5)["x"].to_list() for step in range(3)]
    seen = sum(epoch0, [])
    assert len(seen) == len(set(seen)) == 18  # no row twice in an epoch; the tail of 2 is skipped
    assert epoch0 == [global_batch_rows(data, step, 6, 3, seed=5)["x"].to_list() for step in range(3)]
    assert global_batch_rows(data, 3, 6, 3, seed=5)["x"].to_list() != epoch0[0]  # epoch 1 reshuffles
    assert global_batch_rows(data, 0, 6, 3, seed=6)["x"].to_list() != epoch0[0]


def test_processes_take_contiguous_shares_cut_into_micro_batches():
    step = rows(12)
    shares = [process_rows(step, p, batch_size=2, grad_accum=3) for p in range(2)]
    assert [b.height for share in shares for b in share] == [2] * 6
    assert pl.concat([b for share in shares for b in share])["x"].to_list() == list(range(12))


def test_learning_rate_schedule():
    config = TrainConfig(cache="c", out="o", warmup_steps=2, lr_schedule="linear")
    factor = lr_factor(config, total_steps=10)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == 1.0 and factor(6) == pytest.approx(0.5) and factor(10) == 0.0
    cosine = lr_factor(TrainConfig(cache="c", out="o", lr_schedule="cosine"), total_steps=10)
    assert cosine(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(TrainConfig(cache="c", out="o", lr_schedule="constant"), 10)(9) == 1.0


def test_run_identity_ignores_what_does_not_change_the_computation():
    before = TrainConfig(cache="c", out="a", batch_size=4, grad_accum=2).record({"global_batch": 8})
    now = TrainConfig(cache="c", out="b", batch_size=8, grad_accum=1, save_every=5).record({"global_batch": 8})
    assert run_differences(before, now) == []
    changed = TrainConfig(cache="c", out="b", lr=1e-3).record({"global_batch": 8})
    assert run_differences(before, changed) == ["lr: 5e-07 before, 0.001 now"]


# ---------------------------------------------------------------- run log and folder


def test_a_resumed_run_log_drops_the_steps_after_its_checkpoint(tmp_path):
    log = RunLog(tmp_path, active=True, start_step=0, tensorboard=False)
    for step in range(1, 6):
        log.train({"step": step, "loss": 1.0 / step})
    log.eval(4, {"eval_loss": 0.2})
    log.close()
    resumed = RunLog(tmp_path, active=True, start_step=3, tensorboard=False)
    assert resumed.last_train == {"step": 3, "loss": pytest.approx(1 / 3)}
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "eval.jsonl").read_text() == ""


def test_a_run_folder_is_finished_only_with_a_readable_summary(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.finished_summary() is None
    run.prepare(fresh=True)
    (run.path / "checkpoints" / "step-000001").mkdir(parents=True)
    run.finish({"steps": 1}, {})
    assert run.finished_summary() == {"steps": 1}
    run.summary_path.write_text('{"steps": ')  # killed while writing it (before atomic writes, say)
    assert run.finished_summary() is None
    run.prepare(fresh=False)  # resuming keeps the checkpoints, drops the finished marks
    assert (run.path / "checkpoints").exists() and not run.summary_path.exists()
    run.prepare(fresh=True)
    assert not (run.path / "checkpoints").exists()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(models, tmp_path):
    """A real checkpoint of a tiny model after one AdamW step, written by the trainer's code."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(models["student"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model(torch.tensor([[1, 5, 9, 12]]), labels=torch.tensor([[1, 5, 9, 12]])).loss.backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(123)
    state = {"record": {"total_steps": 10, "lr": 1e-3}, "last_train": {}}
    folder = ckpt.save_checkpoint(accelerator, model, None, optimizer.state_dict(), scheduler,
                                  AutoTokenizer.from_pretrained(models["student"]), tmp_path / "run", 1, state, None)
    return folder, optimizer, scheduler, torch.rand(3)


def test_a_checkpoint_restores_the_optimizer_schedule_and_random_state(saved, models):
    folder, optimizer, scheduler, next_random = saved
    assert ckpt.damage(folder) is None and ckpt.list_checkpoints(folder.parent.parent) == [folder]
    restored = ckpt.load_optimizer_state(folder)
    want = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    for index, values in want["state"].items():  # single process: keys are the parameter indices
        for key, value in values.items():
            assert torch.equal(restored["state"][str(index)][key], value)
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]),
                                              lambda step: 0.5 ** step)
    torch.manual_seed(999)
    assert ckpt.load_scheduler_and_rng(folder, fresh, rank=0) == 1
    assert fresh.last_epoch == scheduler.last_epoch and torch.equal(torch.rand(3), next_random)


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer state", "unreadable trainer state"])
def test_damaged_checkpoints_are_named(saved, damage):
    folder = saved[0]
    target = {"truncated weights": folder / "model" / "model.safetensors",
              "missing optimizer state": folder / "optimizer.safetensors",
              "unreadable trainer state": folder / ckpt.STATE_FILE}[damage]
    if damage == "missing optimizer state":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert str(target) in ckpt.damage(folder)
    with pytest.raises(DadpoError, match="every checkpoint .* is damaged"):
        ckpt.find_start(folder.parent.parent, True, False, {"total_steps": 10}, run_differences, say=print)


# ---------------------------------------------------------------- the manifest


def header(**changes) -> dict:
    model = {"model": "m", "revision": None, "weights_digest": "a" * 64, "tokenizer_digest": "b" * 64,
             "vocab_digest": "c" * 64, "chat_template": True, "template_kwargs": {}, "template_date": None,
             "end_of_turn": [2], "stop_ids": [2], "dtype": "float32", "backend": "hf", "backend_version": "x",
             "fp32_head": False, "server": None}
    base = {"pairs": {"source": "p.jsonl", "fingerprint": "d" * 64, "rows": 10, "extra_columns": [],
                      "prompt_format": "chat"},
            "length_rule": {"max_length": 512, "applies_to": "...", "on_overlong": "drop"}, "shard_size": 4,
            "num_shards": 3, "template_date": None, "reference": dict(model), "teachers": {"": dict(model)}}
    for path, value in changes.items():
        *parents, key = path.split(".")
        target = base
        for part in parents:
            target = target[part]
        target[key] = value
    return new_manifest(base)


def test_the_guard_names_each_difference_and_nothing_else():
    assert differences(header(), header()) == []
    found = differences(header(), header(**{"shard_size": 5, "teachers..dtype": "bfloat16"}))
    assert found == ["shard size: 4 in the cache, 5 requested",
                     'teacher dtype: "float32" in the cache, "bfloat16" requested']
    # a served model may move to another address; its model, version and limit are what count
    served = {"url": "http://a:8000", "served_model": "m", "server_version": "0.32.0", "max_model_len": 512,
              "vocab_size": 600}
    moved = header(**{"teachers..server": {**served, "url": "http://b:9000"}})
    assert differences(header(**{"teachers..server": served}), moved) == []
    assert reuse_identity(moved["teachers"][""]) == reuse_identity(header(**{"teachers..server": served})["teachers"][""])
    assert set(model_records(header())) == {"reference", "teacher"}


def test_shards_are_recorded_under_the_lock_and_complete_the_cache(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(header()))
    for k in (2, 0, 1):
        entry = {"index": k, "file": f"shards/shard-{k:05d}-of-00003.parquet", "rows": 4, "bytes": 10,
                 "pair_range": [4 * k, 4 * k + 4], "sha256": "e" * 64, "dropped_ids": ["x"] if k == 1 else [],
                 "sequences_scored": 16, "sequences_reused": 0}
        manifest = record_shard(tmp_path, entry)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert manifest["totals"] == {"rows": 12, "dropped": 1, "shards_done": 3, "sequences_scored": 48,
                                  "sequences_reused": 0}
    assert (tmp_path / "dropped_ids.txt").read_text() == "x\n"
    manifest = forget_shard(tmp_path, 1)
    assert not manifest["complete"] and read_manifest(tmp_path)["totals"]["shards_done"] == 2


@pytest.mark.parametrize("file", ["../../outside.parquet", "/etc/passwd", "shards/shard-00001-of-00003.parquet"])
def test_a_manifest_cannot_point_outside_its_shards(file):
    manifest = header()
    manifest["shards"] = [{"index": 0, "file": file}]
    with pytest.raises(DadpoError, match="shard 0 names file"):
        check_shard_entries(manifest, "manifest.json")
