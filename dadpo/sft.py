"""`dadpo sft`: distilled supervised fine-tuning (dSFT) of the student on the teacher's responses.

The dSFT student is daDPO's reference model: cache-teacher scores it as `--reference`, and
training starts from it. Per optimizer step (the loop is dadpo.training, shared with train):

    pairs file --load_pairs--> (prompt, chosen) per row; `rejected` is not used
        --tokenize_example (the one rule, the student's own chat template)--> prompt_ids, response_ids
        --prepare: collate (padded, or packed with --packing)-->       [CPU, one step ahead]
        --compute: response log-probs (dadpo.logprobs)-->  sum of -log p over response tokens
    loss = that sum over the global batch / its response token count (prompt tokens carry no loss)

RUN/metrics.jsonl logs per step: loss (mean NLL per response token), tokens (response tokens
trained on), lr, grad_norm, tokens_per_s (all tokens forwarded, prompts included), epoch.
RUN/model is an HF checkpoint (or RUN/adapter with --lora-r).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseBatch, collate
from dadpo.modeling import load_tokenizer, max_positions, resolve_model
from dadpo.pairs import load_pairs, prompt_messages
from dadpo.tokenization import tokenize_example, uses_chat_template
from dadpo.training import LoopConfig, Objective, StepOutput, run_training, split_eval

DROPPED_NAME = "dropped_ids.txt"  # RUN/dropped_ids.txt: pairs left out by --max-length
# Summed per micro-batch: NLL in nats, response tokens. (Not "tokens": the loop's own name for all
# tokens forwarded, prompts included.)
METRIC_NAMES = ("loss", "response_tokens")


@dataclass(kw_only=True)
class SftConfig(LoopConfig):
    """`dadpo sft` flags: the generic ones (dadpo.training.LoopConfig) plus the data's."""

    pairs: str
    lr: float = 2e-5  # a fine-tuning rate, not LoopConfig's DPO one
    max_length: int | None = None  # prompt+response tokens; None: the model's own limit
    on_overlong: str = "drop"  # drop | error
    no_chat_template: bool = False


@dataclass
class SftBatch:
    responses: ResponseBatch
    response_tokens: int


def sft(cfg: SftConfig) -> dict:
    """Run dSFT; return the summary (also RUN/summary.json), with the dropped pair ids added."""
    if not cfg.model:
        raise DadpoError("--model is required: the student to fine-tune (HF hub id or local folder)")
    if cfg.on_overlong not in ("drop", "error"):
        raise DadpoError(f"--on-overlong {cfg.on_overlong}: choose drop or error")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise DadpoError(f"--max-length {cfg.max_length}: must be at least 2")
    pairs = load_pairs(cfg.pairs)
    model = resolve_model(cfg.model, None, "--model")
    tokenizer = load_tokenizer(model, cfg.trust_remote_code, "--model")
    chat = uses_chat_template(tokenizer, cfg.no_chat_template)
    max_length = cfg.max_length or max_positions(model)
    rows, dropped = tokenize_pairs(pairs.frame, tokenizer, chat, max_length, cfg.on_overlong, pairs.source)
    if rows.height == 0:
        raise DadpoError(f"{pairs.source}: every pair is longer than --max-length {max_length}")
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    summary = run_training(cfg, model=model, tokenizer=tokenizer, train_rows=train_rows, eval_rows=eval_rows,
                           objective=sft_objective(pad_id, cfg.packing),
                           record={"model": model.name, "pairs_fingerprint": pairs.fingerprint,
                                   "chat_template": chat, "max_length": max_length})
    if dropped and summary.get("main_process", True):
        (Path(cfg.out) / DROPPED_NAME).write_text("".join(f"{pair_id}\n" for pair_id in dropped))
    return {**summary, "dropped_ids": dropped}


def tokenize_pairs(frame: pl.DataFrame, tokenizer, chat: bool, max_length: int | None, on_overlong: str,
                   source: str) -> tuple[pl.DataFrame, list[str]]:
    """(id, prompt_ids, response_ids, response_tokens) per pair, over-long pairs dropped (or refused)."""
    ids, prompt_ids, response_ids, dropped = [], [], [], []
    for pair_id, prompt_json, chosen in frame.select("id", "prompt", "chosen").iter_rows():
        where = f"{source} row id '{pair_id}'"
        prompt, response = tokenize_example(tokenizer, prompt_messages(prompt_json), chosen, chat, where)
        if max_length is not None and len(prompt) + len(response) > max_length:
            if on_overlong == "error":
                raise DadpoError(f"{where}: {len(prompt) + len(response)} tokens exceed --max-length {max_length} "
                                 "(pass --on-overlong drop to skip such pairs)")
            dropped.append(pair_id)
            continue
        ids.append(pair_id)
        prompt_ids.append(prompt)
        response_ids.append(response)
    rows = pl.DataFrame({
        "id": pl.Series(ids, dtype=pl.Utf8),
        "prompt_ids": pl.Series(prompt_ids, dtype=pl.List(pl.Int32)),
        "response_ids": pl.Series(response_ids, dtype=pl.List(pl.Int32)),
        "response_tokens": pl.Series([len(r) for r in response_ids], dtype=pl.Int64),
    })
    return rows, dropped


def sft_objective(pad_id: int, packing: bool = False) -> Objective:
    """dSFT for dadpo.training: the gradient is that of the mean NLL per response token of the global batch."""

    def prepare(rows: pl.DataFrame) -> SftBatch:
        sequences = list(zip(rows["prompt_ids"].to_list(), rows["response_ids"].to_list()))
        return SftBatch(collate(sequences, pad_id, packed=packing), int(rows["response_tokens"].sum()))

    def compute(policy, batch: SftBatch, device) -> StepOutput:
        nll = -policy(batch.responses.to(device))  # float64 [N]: -sum log p over each response
        return StepOutput(loss_sum=nll.sum(),
                          metric_sums={"loss": float(nll.detach().sum()), "response_tokens": batch.response_tokens,
                                       "count": len(nll)},
                          tokens=batch.responses.num_tokens)

    def finalize(totals: dict) -> dict:
        tokens = totals["response_tokens"]
        return {"loss": totals["loss"] / max(tokens, 1.0), "tokens": int(tokens),
                "nll_per_example": totals["loss"] / max(totals["count"], 1.0)}

    return Objective(metric_names=METRIC_NAMES, prepare=prepare, compute=compute,
                     normalizer=lambda rows: float(rows["response_tokens"].sum()), finalize=finalize,
                     unit="examples")
