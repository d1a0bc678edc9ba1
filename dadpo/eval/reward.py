"""The reward-model judge: a *ForSequenceClassification model with one label scores each
(prompt, response) conversation; a candidate beats the baseline on a prompt with probability

    P(win) = sigma(r_candidate - r_baseline) = 1 / (1 + exp(-(r_c - r_b)))     (Bradley-Terry)

The conversation (a string prompt is one user turn) plus the assistant response is rendered by the
reward model's own chat template through dadpo's tokenization rule (ModelTokenizer.encode_conversation:
template variables, pinned date, one-line template errors), and the reward is the model's score at the
conversation's last token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dadpo.errors import DadpoError

FLAG = "--judge"


def _read_config(path: str) -> dict | None:
    """config.json of a local folder, or of a hub id (that one file only); None when there is none."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
    elif folder.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(path, "config.json"))
        except Exception:  # not on the hub, offline, no access: not a reward model we can read
            return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _num_labels(config: dict) -> int:
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    return int(config.get("num_labels", 2))  # transformers' default when the config names no labels


def is_reward_model(path: str) -> bool:
    """True for a local folder or hub id whose config.json names a *ForSequenceClassification
    architecture with one label (a scalar reward)."""
    config = _read_config(path)
    if config is None:
        return False
    architectures = config.get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures) and _num_labels(config) == 1


def reward_outcome(r_candidate: float, r_baseline: float) -> float:
    """P(candidate beats baseline) = sigma(r_c - r_b) = 1 / (1 + exp(-(r_c - r_b))), computed without
    overflow for large differences; NaN when either reward is NaN."""
    difference = float(r_candidate) - float(r_baseline)
    if math.isnan(difference):
        return float("nan")
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    e = math.exp(difference)
    return e / (1.0 + e)


def _free_id(used: set[int], preferred: int, vocab_size: int) -> int:
    """An id that no sequence of the batch holds, the tokenizer's pad id when possible: the model reads
    the reward at the rightmost token that is not the pad id, so no real token may share it."""
    if preferred not in used:
        return preferred
    return next(i for i in range(vocab_size) if i not in used)


class RewardModel:
    """A reward model loaded once (HF transformers, in eval mode) to score many conversations."""

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", template_kwargs: dict | None = None,
                 date: str | None = None):
        from dadpo.modeling import (_quiet_transformers, max_positions, model_tokenizer, refuse_remote_code,
                                    resolve_model, torch_dtype)
        from dadpo.errors import first_line
        from dadpo.tokenization import check_date

        check_date(date)
        resolved = resolve_model(path, flag=FLAG)
        if not is_reward_model(resolved.local_path):
            raise DadpoError(f"{FLAG} {path}: not a reward model (its config.json names no *ForSequenceClassification "
                             "architecture with one label)")
        self.name = path
        self.rule = model_tokenizer(resolved, FLAG, template_kwargs=template_kwargs, template_date=date)
        self.max_length = max_positions(resolved)
        refuse_remote_code(resolved, False, FLAG)
        import torch
        from transformers import AutoModelForSequenceClassification

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DadpoError(f"{FLAG} {path}: device {device} asked for, but no CUDA device is available")
        try:
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(resolved.local_path,
                                                                           dtype=torch_dtype(dtype))
            self.model = model.to(device).eval()
        except DadpoError:
            raise
        except Exception as exc:  # transformers and torch raise many types; the user needs one line
            raise DadpoError(f"{FLAG} {path}: cannot load the reward model ({first_line(exc)})") from None
        self.device = device

    def encode(self, prompt, response: str, where: str) -> list[int]:
        """The ids the reward model reads for one (prompt, response): a string prompt is one user turn."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = self.rule.encode_conversation(messages, response, where)
        if self.max_length is not None and len(ids) > self.max_length:
            raise DadpoError(f"{where}: the conversation is {len(ids)} tokens, over the {self.max_length} positions "
                             f"of {FLAG} {self.name}")
        return ids

    def rewards(self, prompts: list, responses: list[str], batch_size: int = 8,
                ids: list[str] | None = None) -> np.ndarray:
        """The reward of each (prompt, response), float64, in input order. Conversations are batched by
        length, right-padded, and the padding never attended to. `ids` name the rows in error messages."""
        import torch

        from dadpo.errors import first_line
        from dadpo.tokenization import pad_id_of

        if len(prompts) != len(responses):
            raise DadpoError(f"{FLAG} {self.name}: {len(prompts)} prompts but {len(responses)} responses")
        names = ids if ids is not None else [str(i) for i in range(len(prompts))]
        encoded = [self.encode(p, r, f"prompt {name}") for p, r, name in zip(prompts, responses, names)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        result = np.empty(len(encoded), dtype=np.float64)
        text_config = self.model.config.get_text_config()
        vocab_size = self.model.get_input_embeddings().num_embeddings
        preferred = pad_id_of(self.rule.tokenizer)
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start:start + max(1, batch_size)]
            width = max(len(encoded[i]) for i in chunk)
            pad = _free_id({t for i in chunk for t in encoded[i]}, preferred, vocab_size)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = 1
            text_config.pad_token_id = pad  # where the model finds each row's last real token
            try:
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            except Exception as exc:  # e.g. out of memory: one line naming the model and a row
                raise DadpoError(f"{FLAG} {self.name}: scoring failed at prompt {names[chunk[0]]} "
                                 f"({type(exc).__name__}: {first_line(exc)})") from None
            result[chunk] = logits[:, 0].double().cpu().numpy()
        return result

    def close(self) -> None:
        """Free the model's memory (the judge is done)."""
        import gc

        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
