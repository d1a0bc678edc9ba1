"""The synthetic chat task: short string and number transformations with exactly checkable answers.

    reverse  "Reverse: kqzd"        -> "dzqk"
    sort     "Sort: kqzd"           -> "dkqz"
    add      "Add: 37+48"           -> "85"

Prompts are rendered through a chat template (a tiny ChatML-like one, built below with a
character-level tokenizer), so the whole dadpo pipeline sees ordinary chat data.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

TASKS = ("reverse", "sort")
LETTERS = string.ascii_lowercase
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = LETTERS + string.digits + " :+?-=.,'" + string.ascii_uppercase


def make_example(rng: random.Random, min_len: int = 3, max_len: int = 7) -> dict:
    """One {prompt, answer} example of a random task."""
    task = rng.choice(TASKS)
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"task": task, "prompt": f"Add: {a}+{b}", "answer": str(a + b)}
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
    answer = word[::-1] if task == "reverse" else "".join(sorted(word))
    return {"task": task, "prompt": f"{task.capitalize()}: {word}", "answer": answer}


def make_split(n: int, seed: int, exclude: set[str] | None = None, min_len: int = 3, max_len: int = 7) -> list[dict]:
    """n distinct examples (distinct prompts), none of whose prompts is in `exclude`."""
    rng, seen, rows = random.Random(seed), set(exclude or ()), []
    while len(rows) < n:
        example = make_example(rng, min_len, max_len)
        if example["prompt"] in seen:
            continue
        seen.add(example["prompt"])
        rows.append({"id": f"s{seed}-{len(rows):05d}", **example})
    return rows


def wrong_answer(rng: random.Random, example: dict) -> str:
    """A plausible wrong answer (for the ground-truth pairs the teacher is trained on)."""
    answer = example["answer"]
    if example["task"] == "add":
        return str(int(answer) + rng.choice([-10, -1, 1, 10]))
    letters = list(answer)
    i, j = rng.sample(range(len(letters)), 2)
    letters[i], letters[j] = letters[j], letters[i]
    return "".join(letters) if letters != list(answer) else answer + rng.choice(LETTERS)


def build_tokenizer(out_dir: Path, max_length: int = 64):
    """A character-level fast tokenizer with the chat template above, saved to out_dir."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"] + list(dict.fromkeys(CHARACTERS)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length,
                                        clean_up_tokenization_spaces=False, eos_token="<|end|>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens=SPECIAL_TOKENS[2:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer
