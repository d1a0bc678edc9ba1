"""Training features on tiny real models: LoRA, gradient checkpointing, bf16 autocast, packing,
length-normalised log-probs, tensorboard and `dadpo report`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dadpo.cache import open_cache
from dadpo.errors import DadpoError
from dadpo.layout_checks import check_packing, probe_pairs
from dadpo.logprobs import ResponseLogprobs, collate
from dadpo.modeling import load_policy, resolve_model
from dadpo.recipes.dadpo import TrainConfig, train
from dadpo.training.data import global_batch_rows, split_eval

from support import (assert_logps_close, assert_one_line_error, assert_same_steps, logp_tolerance, metrics,
                     naive_logprob, run_cli, train_cli)

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(cache_dir, models, **changes) -> dict:
    return {**dict(cache=str(cache_dir), model=str(models["student_b"]), lr=1e-3, batch_size=4, grad_accum=1,
                   max_steps=2, seed=2, eval_fraction=0.1, progress=False), **changes}


@pytest.fixture(scope="module")
def baseline(cache_dir, models, tmp_path_factory):
    """A plain fp32, padded, full fine-tuning run the variants are compared with."""
    out = tmp_path_factory.mktemp("features") / "baseline"
    train(TrainConfig(out=str(out), **settings(cache_dir, models)))
    return out


def test_lora_saves_an_adapter_and_a_merged_model(cache_dir, models, tmp_path):
    from peft import PeftModel

    run = tmp_path / "lora"
    summary = train(TrainConfig(out=str(run), **settings(cache_dir, models, lr=1e-2, lora_r=4, lora_alpha=8,
                                                            lora_targets="q_proj,v_proj", merge_lora=True)))
    assert summary["model_dir"] == str(run / "model")
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}

    base = AutoModelForCausalLM.from_pretrained(models["student_b"])
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    trained_b = [p for name, p in adapted.named_parameters() if "lora_B" in name]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b)  # lora_B starts at 0: it trained
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert AutoTokenizer.from_pretrained(run / "model").chat_template
    ids = torch.tensor([[1, 5, 9, 40, 300, 12, 7]])
    with torch.no_grad():
        adapted_logits, merged_logits = adapted(ids).logits, merged(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)
    # the policy start itself was not changed on disk
    reloaded = AutoModelForCausalLM.from_pretrained(models["student_b"]).state_dict()
    assert all(torch.equal(reloaded[k], base_weights[k]) for k in base_weights)


def test_gradient_checkpointing_gives_the_same_step(cache_dir, models, baseline, tmp_path):
    run = tmp_path / "gc"
    train(TrainConfig(out=str(run), gradient_checkpointing=True, **settings(cache_dir, models)))
    assert_same_steps(metrics(run)[:1], metrics(baseline)[:1], keys=("loss", "grad_norm"), tolerance=1e-6)
    lm = load_policy(TrainConfig(out=str(tmp_path / "unused"), gradient_checkpointing=True,
                                 **settings(cache_dir, models)), resolve_model(str(models["student_b"])))
    assert lm.is_gradient_checkpointing


def test_bf16_mixed_precision_autocasts(cache_dir, models, baseline, tmp_path):
    run = tmp_path / "bf16"  # the baseline's settings, through the CLI (the autocast mode is per process)
    train_cli("--cache", cache_dir, "--out", run, "--model", models["student_b"], "--lr", "1e-3", "--batch-size", 4,
              "--grad-accum", 1, "--max-steps", 1, "--seed", 2, "--eval-fraction", 0.1, "--mixed-precision", "bf16")
    fp32_loss, bf16_loss = metrics(baseline)[0]["loss"], metrics(run)[0]["loss"]
    assert 0 < abs(bf16_loss - fp32_loss) < 0.05  # computed in bf16 (so not identical), yet close
    assert AutoModelForCausalLM.from_pretrained(run / "model").dtype == torch.float32  # weights stay fp32


@pytest.mark.parametrize("family", ["student", "teacher"])  # tiny Qwen3 and tiny Llama
def test_packed_logprobs_equal_padded(models, cache_dir, family):
    tokenizer = AutoTokenizer.from_pretrained(models[family])
    rows = open_cache(cache_dir).read().head(5)  # real chat-template sequences (the reference tokenization)
    sequences = [(p, r) for p, c, rj in rows.select("ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids").iter_rows()
                 for r in (c, rj)]
    if family == "teacher":  # the same lengths, in the teacher's vocabulary
        sequences = [([i % tokenizer.vocab_size for i in p], [i % tokenizer.vocab_size for i in r]) for p, r in sequences]
    assert len({len(p) + len(r) for p, r in sequences}) > 3  # mixed lengths: padding matters
    logprobs = ResponseLogprobs(AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)).eval()
    with torch.no_grad():
        padded = logprobs(collate(sequences, tokenizer.pad_token_id))
        packed_batch = collate(sequences, tokenizer.pad_token_id, packed=True)
        packed = logprobs(packed_batch)
    assert packed_batch.input_ids.shape == (1, sum(len(p) + len(r) for p, r in sequences))  # no padding
    assert_logps_close(packed, padded, [len(r) for _, r in sequences], f"packed vs padded ({family})")


def test_packed_training_matches_padded(cache_dir, models, baseline, tmp_path):
    run = tmp_path / "packed"
    train(TrainConfig(out=str(run), packing=True, **settings(cache_dir, models)))
    assert_same_steps(metrics(run), metrics(baseline), keys=("loss", "margin", "grad_norm"), tolerance=1e-5)


def test_packing_is_refused_where_the_model_cannot_separate_sequences():
    """Bloom's decoder takes no position_ids; OPT's attention ignores packed boundaries."""
    tiny = {"bloom": dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=2),
            "opt": dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                        word_embed_proj_dim=64, max_position_embeddings=128)}
    messages = {"bloom": "does not take position_ids", "opt": "lets packed sequences attend to each other"}
    for model_type, sizes in tiny.items():
        torch.manual_seed(0)
        logprobs = ResponseLogprobs(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)))
        with pytest.raises(DadpoError, match=f"--packing: tiny-{model_type} {messages[model_type]}.*without --packing"):
            check_packing(logprobs, [(p, c) for p, c, _ in probe_pairs(300)], "cpu", f"tiny-{model_type}")


def test_mean_normalised_loss_equals_hand_computation(cache_dir, models, tmp_path):
    run = tmp_path / "mean"
    beta1, beta2, batch, seed = 0.5, 0.2, 4, 9
    train(TrainConfig(out=str(run), **settings(cache_dir, models, beta1=beta1, beta2=beta2, batch_size=batch,
                                               max_steps=1, seed=seed, logp_norm="mean")))
    train_rows, _ = split_eval(open_cache(cache_dir).read(), 0.1)
    rows = global_batch_rows(train_rows, step=0, global_batch=batch, steps_per_epoch=10**9, seed=seed)
    policy = AutoModelForCausalLM.from_pretrained(models["student_b"], dtype=torch.float32).eval()
    losses = []
    for row in rows.iter_rows(named=True):
        assert row["ref_ntok_chosen"] == len(row["ref_chosen_ids"])  # the policy reads the reference tokenization
        prompt = row["ref_prompt_ids"]
        policy_c = naive_logprob(policy, prompt, row["ref_chosen_ids"]) / row["ref_ntok_chosen"]
        policy_r = naive_logprob(policy, prompt, row["ref_rejected_ids"]) / row["ref_ntok_rejected"]
        h_policy = policy_c - policy_r
        h_ref = row["ref_logp_chosen"] / row["ref_ntok_chosen"] - row["ref_logp_rejected"] / row["ref_ntok_rejected"]
        h_teacher = (row["teacher_logp_chosen"] / row["teacher_ntok_chosen"]
                     - row["teacher_logp_rejected"] / row["teacher_ntok_rejected"])
        u = beta1 * (h_policy - h_ref) + beta2 * (h_policy - h_teacher)
        losses.append(math.log1p(math.exp(-u)))
    first = metrics(run)[0]
    # each mean log-prob within logp_tolerance(n) / n; the loss moves by at most (beta1 + beta2) x a pair's two
    tolerance = (beta1 + beta2) * sum(logp_tolerance(r["ref_ntok_chosen"]) / r["ref_ntok_chosen"]
                                      + logp_tolerance(r["ref_ntok_rejected"]) / r["ref_ntok_rejected"]
                                      for r in rows.iter_rows(named=True)) / rows.height + 1e-6
    assert first["loss"] == pytest.approx(sum(losses) / len(losses), abs=tolerance)
    assert first["h_ref"] == pytest.approx(sum(r["ref_logp_chosen"] / r["ref_ntok_chosen"] - r["ref_logp_rejected"]
                                               / r["ref_ntok_rejected"] for r in rows.iter_rows(named=True)) / batch)


def test_tensorboard_events_and_report_png(cache_dir, models, baseline, tmp_path):
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb-run"
    train(TrainConfig(out=str(run), report_to="tensorboard", eval_every=1, save_every=1, keep_checkpoints=1,
                      **settings(cache_dir, models)))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # --keep-checkpoints 1
    assert list((run / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s["step"], pytest.approx(s["loss"], rel=1e-6)) for s in metrics(run)]
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2]  # --eval-every 1, then the final eval
    assert [e["step"] for e in metrics(run, "eval.jsonl")] == [1, 2]

    png = tmp_path / "curves.png"
    result = run_cli("report", run, baseline, "--out", png)
    assert result.returncode == 0, result.stderr
    assert "2 run(s): tb-run, baseline" in result.stdout
    image = imread(png)
    assert image.shape == (450, 1500, 4)  # 15 x 4.5 inches at 100 dpi
    colours = {tuple(pixel) for pixel in image[::5, ::5, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 20 and image[..., :3].std() > 0.05  # lines, text and axes, not a blank canvas

    assert_one_line_error(run_cli("report", tmp_path / "nothing-here"), "nothing-here", "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("report", tmp_path / "empty"), "no metrics.jsonl")


def test_prefix_sharing_is_on_by_default_and_trains_as_unshared(cache_dir, models, baseline, tmp_path, capsys):
    """The baseline ran with the default (auto: shared [prompt | chosen | rejected] rows); the same run
    with chosen and rejected as separate sequences gives the same steps."""
    run = tmp_path / "unshared"
    train(TrainConfig(out=str(run), prefix_sharing="off", **settings(cache_dir, models)))
    assert_same_steps(metrics(run), metrics(baseline), keys=("loss", "margin", "grad_norm"), tolerance=1e-5)
    # fewer tokens fed per step when the prompt runs once
    assert metrics(baseline)[0]["tokens_per_s"] > 0 and "prefix sharing is off" not in capsys.readouterr().out


def test_prefix_sharing_on_is_refused_for_a_model_that_cannot_share(cache_dir, models, tmp_path, capsys):
    """A sliding-window attention would need its own mask: `on` refuses in one line, `auto` trains unshared
    and says why."""
    windowed = tmp_path / "windowed"
    shutil.copytree(models["student_b"], windowed)
    config = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 8, "use_sliding_window": True,
                                                      "layer_types": ["sliding_attention"] * config["num_hidden_layers"]}))
    result = run_cli("train", "--cache", cache_dir, "--out", tmp_path / "on", "--model", windowed, "--prefix-sharing",
                     "on", "--max-steps", 1, "--batch-size", 4, "--grad-accum", 1, "--quiet")
    assert_one_line_error(result, "--prefix-sharing on", "windowed cannot share prompts", "sliding",
                          "run with --prefix-sharing off")
    train(TrainConfig(out=str(tmp_path / "auto"), **settings(cache_dir, models, model=str(windowed), max_steps=1)))
    assert "note: prefix sharing is off for this run" in capsys.readouterr().out
