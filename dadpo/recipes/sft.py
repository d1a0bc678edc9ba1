"""`dadpo sft`: distilled supervised fine-tuning (dSFT) of the student on the teacher's responses.

The dSFT student is daDPO's reference model: cache-teacher scores it as `--reference`, and training
starts from it. Top to bottom:
    1. the pairs: (prompt, chosen) per row, tokenized for the student by the one rule
       (dadpo.tokenization), the length rule applied; `rejected` is not used
    2. the trainer (dadpo.training.Trainer, shared with `dadpo train`)
    3. each step: rows -> one padded (or packed) batch -> the policy's response log-probs
       (dadpo.logprobs) -> loss = sum of -log p over the global batch's response tokens / their count
    4. the final eval, RUN/model (the reference for cache-teacher), RUN/summary.json

RUN/metrics.jsonl logs per step: loss (mean NLL per response token), tokens (response tokens trained
on), lr, grad_norm, tokens_per_s (all tokens forwarded, prompts included), epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dadpo.atomic import write_text_atomic
from dadpo.errors import DadpoError
from dadpo.logprobs import collate
from dadpo.modeling import max_positions, model_tokenizer, resolve_model
from dadpo.config import SftConfig
from dadpo.pairs import decode_prompt, load_pairs
from dadpo.tokenization import DROPPED_NAME, check_date, length_rule, pad_id_of, pair_responses, parse_template_kwargs, today
from dadpo.training.data import split_eval
from dadpo.training.trainer import Trainer

# Summed per micro-batch: NLL in nats, response tokens. (Not "tokens": the trainer's own name for
# all tokens forwarded, prompts included.)
METRIC_NAMES = ("loss", "response_tokens")


@dataclass
class SftBatch:
    responses: object  # dadpo.logprobs.ResponseBatch
    response_tokens: int


def sft(cfg: SftConfig) -> dict:
    """Run dSFT; return the summary (also RUN/summary.json), with the dropped pair ids added."""
    # 1. the pairs, tokenized for the student
    if not cfg.model:
        raise DadpoError("--model is required: the student to fine-tune (HF hub id or local folder)")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise DadpoError(f"--max-length {cfg.max_length}: must be at least 2")
    check_date(cfg.template_date)
    cfg.check()
    pairs = load_pairs(cfg.pairs, split=cfg.pairs_split, prompt_format=cfg.prompt_format)
    model = resolve_model(cfg.model, None, "--model")
    student = model_tokenizer(model, "--model", no_chat_template=cfg.no_chat_template,
                              template_kwargs=parse_template_kwargs(cfg.template_kwargs, "--template-kwargs"),
                              template_date=cfg.template_date or today(), trust_remote_code=cfg.trust_remote_code)
    max_length = cfg.max_length or max_positions(model)
    rows, dropped = tokenize_examples(pairs, student, max_length, cfg.on_overlong)
    if rows.height == 0:
        raise DadpoError(f"{pairs.source}: every pair is longer than --max-length {max_length}")
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)
    pad_id = pad_id_of(student.tokenizer)

    # 2. the trainer
    trainer = Trainer(cfg, model=model, tokenizer=student.tokenizer, train_rows=train_rows.height, unit="examples",
                      metric_names=METRIC_NAMES,
                      record={"model": model.name, "pairs_fingerprint": pairs.fingerprint,
                              "tokenizer_digest": student.digest, "max_length": max_length},
                      reads={"--pairs": cfg.pairs})
    _, packed = trainer.choose_layout(pairs=False)

    def make_batch(batch_rows: pl.DataFrame) -> SftBatch:
        sequences = list(zip(batch_rows["prompt_ids"].to_list(), batch_rows["response_ids"].to_list()))
        return SftBatch(collate(sequences, pad_id, packed=packed), int(batch_rows["response_tokens"].sum()))

    def evaluate() -> dict:
        totals = trainer.new_totals()
        for batch in trainer.eval_batches(eval_rows, make_batch):
            nll = -trainer.policy(batch.responses.to(trainer.device))
            trainer.add(totals, nll_sums(nll, batch), batch.responses.num_tokens)
        reduced = trainer.reduce(totals)
        return {f"eval_{k}": v for k, v in per_token_loss(reduced).items()} | {"eval_examples": int(reduced["count"])}

    # 3. the steps: the gradient is that of the mean NLL per response token of the global batch
    response_tokens = lambda global_rows: float(global_rows["response_tokens"].sum())  # noqa: E731
    for step in trainer.steps(train_rows, make_batch, normalizer=response_tokens):
        for batch in trainer.accumulate(step):
            nll = -trainer.policy(batch.responses.to(trainer.device))  # float64 [N]: -sum log p per response
            trainer.backward(nll.sum(), step.normalizer, nll_sums(nll, batch), batch.responses.num_tokens)
        trainer.optimizer_step(per_token_loss, evaluate)

    # 4. eval and save
    summary = trainer.finish(evaluate() if eval_rows.height else {}, eval_rows.height, {"dropped_ids": dropped})
    if dropped and trainer.is_main_process:
        write_text_atomic(trainer.run.path / DROPPED_NAME, "".join(f"{pair_id}\n" for pair_id in dropped))
    return summary


def nll_sums(nll, batch: SftBatch) -> dict:
    return {"loss": float(nll.detach().sum()), "response_tokens": batch.response_tokens, "count": len(nll)}


def per_token_loss(totals: dict) -> dict:
    tokens = totals["response_tokens"]
    return {"loss": totals["loss"] / max(tokens, 1.0), "tokens": int(tokens),
            "nll_per_example": totals["loss"] / max(totals["count"], 1.0)}


def tokenize_examples(pairs, student, max_length: int | None, on_overlong: str) -> tuple[pl.DataFrame, list[str]]:
    """(id, prompt_ids, response_ids, response_tokens) per pair, over-long pairs dropped (or refused)."""
    ids, prompt_ids, response_ids, dropped = [], [], [], []
    for row in pairs.read().iter_rows(named=True):
        where = f"{pairs.source} row id '{row['id']}'"
        chosen, _ = pair_responses(row)
        prompt = student.encode_prompt(decode_prompt(row["prompt"]), where)
        response = student.encode_response(chosen, prompt, where)
        if length_rule(len(prompt) + len(response), max_length, on_overlong, f"{where} ({student.name})"):
            dropped.append(row["id"])
            continue
        ids.append(row["id"])
        prompt_ids.append(prompt)
        response_ids.append(response)
    rows = pl.DataFrame({
        "id": pl.Series(ids, dtype=pl.Utf8),
        "prompt_ids": pl.Series(prompt_ids, dtype=pl.List(pl.Int32)),
        "response_ids": pl.Series(response_ids, dtype=pl.List(pl.Int32)),
        "response_tokens": pl.Series([len(r) for r in response_ids], dtype=pl.Int64),
    })
    return rows, dropped
