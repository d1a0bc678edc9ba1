"""Tiny random-init teacher/student models and synthetic preference pairs.

No model can be downloaded in tests, the demo or benchmarks, so these helpers build small
HF causal LMs locally. The two families deliberately differ in architecture (Llama vs
Qwen3), tokenizer (byte-level BPE vs Metaspace BPE with byte fallback), BOS handling and
chat template, so cross-tokenizer code paths get exercised. A third family, "unlisted_end", is a
base model given a chat template whose end-of-turn token is special but listed nowhere but
added_tokens_decoder (as Llama 3.1 base's <|eot_id|>, Phi's <|end|>).
"""

from __future__ import annotations

import json
import pathlib
import random

# Bump when the build recipe changes, so cached demo models get rebuilt.
_RECIPE_VERSION = 2
_MARKER = "dadpo_tiny.json"

# ChatML. Every message, assistant included, renders the same way, so the prompt rendered
# with add_generation_prompt=True is a string prefix of prompt + answer.
TEACHER_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Zephyr-like. The generation prompt ends with a space on purpose: tokenizing the prompt
# alone yields a lone "▁" token that the full conversation merges into "▁Answer".
STUDENT_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|> ' + message['content'] + eos_token + '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|> ' -}}{%- endif -%}"
)

# A base model given a chat template (Phi-3 style): every message ends with <|end|>, a token its
# tokenizer marks special in added_tokens_decoder but lists in no special-token list (so not in
# all_special_ids), while eos stays the base model's <|endoftext|>. The model emits <|end|>, not eos,
# after an answer.
UNLISTED_END = "<|end|>"
UNLISTED_END_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
FAMILIES = ("teacher", "student", "unlisted_end")

# Test templates that reproduce what real chat templates do (ChatML markers, so the tiny teacher
# tokenizer's special tokens apply; <think> and </think> are added, non-special tokens as in Qwen3
# and the DeepSeek-R1 distills). Written for dadpo's tests and demo; each names the behaviour it copies.
TEMPLATES = {
    "chatml": TEACHER_CHAT_TEMPLATE,
    # DeepSeek-R1-Distill / QwQ: the generation prompt opens <think>, and an assistant turn keeps only
    # what follows </think>.
    "think": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- set content = message['content'] -%}"
        "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
        "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
    ),
    # Qwen3: enable_thinking=false closes an empty think block in the generation prompt; reasoning is
    # dropped from turns before the last user message; the last assistant turn always shows a think block.
    "thinking_switch": (
        "{%- set ns = namespace(last_user=0) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- set content = message['content'] -%}{%- set reasoning = '' -%}"
        "{%- if '</think>' in content -%}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
        "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
        "{%- else -%}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
        "{%- endif -%}{%- endif -%}"
    ),
    # Llama 3.2: today's date in the system header (strftime_now), every message's content trimmed.
    "trim_date": (
        "{%- if not date_string is defined -%}{%- set date_string = strftime_now('%d %b %Y') -%}{%- endif -%}"
        "{{- '<|im_start|>system\\nToday Date: ' + date_string + '\\n' -}}"
        "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] | trim -}}"
        "{%- set messages = messages[1:] -%}{%- endif -%}{{- '<|im_end|>\\n' -}}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Gemma 2: no system role; user and assistant must alternate, starting with the user.
    "strict_roles": (
        "{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # gpt-oss: a reasoning_effort variable written into the system message (default medium).
    "effort": (
        "{%- if reasoning_effort is not defined -%}{%- set reasoning_effort = 'medium' -%}{%- endif -%}"
        "{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' -}}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
}
THINK_TOKENS = ("<think>", "</think>")

_CORPUS = """\
The quick brown fox jumps over the lazy dog.
You are a helpful assistant. Answer the question briefly and correctly.
What is 12 + 30? The answer is 42.
Reverse the word 'apple'. The reversed word is elppa.
How many letters are in the word banana? There are six letters.
Write the word in upper case: CAFÉ, NAÏVE, HELLO, WORLD.
Let me think step by step before I give the final answer.
First, we add the tens. Then, we add the ones. Finally, we combine them.
I am not sure, but I think the answer might be slightly different.
She ordered a café au lait and a croissant at the little café.
His naïve question made everyone smile; the résumé was déjà vu.
日本語のテキストも少し含めます。東京は日本の首都です。
Emoji are text too: 🙂 🚀 🎉 ❤️ 👍
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.
Punctuation matters: commas, periods. Questions? Exclamations! (parentheses) "quotes" 'single'.
def add(a, b):
    return a + b
The teacher model writes a good answer; the student model writes a worse one.
Distillation transfers knowledge from a large teacher to a small student.
Preference pairs contain a prompt, a chosen answer and a rejected answer.
Über, jalapeño, crème brûlée, piñata, smörgåsbord, façade.
Repeat the phrase twice, separated by a space.
Count the vowels in the word education. There are five vowels.
Sort these numbers from smallest to largest: 9, 3, 7, 1.
The capital of France is Paris. The capital of Japan is Tokyo.
Hello! How can I help you today?
Sure, here is the answer you asked for.
Is that correct? Yes, that is correct. No, that is wrong.
Thank you very much for your patience and your question.
"""


def _train_teacher_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A non-None post-processor stops transformers from installing its own BOS/EOS one.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                 "extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}


def _train_student_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chat = ["<|system|>", "<|user|>", "<|assistant|>"]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tmp = Tokenizer(models.BPE(unk_token="<unk>"))
    tmp.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + chat, show_progress=False)
    tmp.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)

    # Llama/Mistral-style byte fallback: the trainer cannot add <0xXX> tokens as ordinary
    # (non-special) vocab entries, so rebuild the BPE model with them inserted after the specials.
    trained = json.loads(tmp.to_str())["model"]
    order = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    head = [t for t, _ in order[: len(specials + chat)]]
    tail = [t for t, _ in order[len(specials + chat):]]
    vocab = {t: i for i, t in enumerate(head + [f"<0x{b:02X}>" for b in range(256)] + tail)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    # No Fuse before Metaspace: Metaspace on one fused token drops every "▁" instead of mapping it to " ".
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + chat])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                 "extra_special_tokens": chat}


def _train_unlisted_end_tokenizer():
    from tokenizers import AddedToken

    tok, _ = _train_teacher_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|system|>", "<|user|>", "<|assistant|>", UNLISTED_END)])
    # no extra_special_tokens: the chat tokens are special only in added_tokens_decoder
    return tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _build_tokenizer(family: str, model_max_length: int, template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    train = {"teacher": _train_teacher_tokenizer, "student": _train_student_tokenizer,
             "unlisted_end": _train_unlisted_end_tokenizer}[family]
    backend, special = train()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode an exact inverse of encode
        **special,
    )
    default = {"teacher": TEACHER_CHAT_TEMPLATE, "student": STUDENT_CHAT_TEMPLATE,
               "unlisted_end": UNLISTED_END_CHAT_TEMPLATE}[family]
    tok.chat_template = TEMPLATES[template] if template else default
    return tok


def build_tiny_model(out_dir, *, family: str, seed: int = 0, hidden_size: int = 128, num_layers: int = 2,
                     num_heads: int = 2, intermediate_size: int = 256,
                     max_position_embeddings: int = 512, template: str | None = None) -> pathlib.Path:
    """Write a random-init causal LM + tokenizer for `family` ("teacher", "student" or "unlisted_end",
    a Llama whose random weights end a response with <|end|> after ~5 tokens) to `out_dir`.

    template: a TEMPLATES name (they use the teacher family's ChatML tokens), else the family's own.
    vLLM's CPU backend needs head_dim 64, i.e. hidden_size / num_heads == 64 (the defaults).
    """
    return _write_tiny(out_dir, family=family, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, intermediate_size=intermediate_size,
                       max_position_embeddings=max_position_embeddings, template=template, head="causal")


def build_tiny_reward_model(out_dir, *, seed: int = 0, family: str = "teacher", hidden_size: int = 128,
                            num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 256,
                            max_position_embeddings: int = 512, template: str | None = None) -> pathlib.Path:
    """Write a random-init reward model to `out_dir`: the family's architecture (Llama or Qwen3) as
    *ForSequenceClassification with one label (a scalar reward read at the last token), the family's
    tokenizer and chat template, pad_token_id in the config (batched scoring)."""
    return _write_tiny(out_dir, family=family, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, intermediate_size=intermediate_size,
                       max_position_embeddings=max_position_embeddings, template=template, head="reward")


def _write_tiny(out_dir, *, family: str, seed: int, hidden_size: int, num_layers: int, num_heads: int,
                intermediate_size: int, max_position_embeddings: int, template: str | None,
                head: str) -> pathlib.Path:
    """One builder for both heads: "causal" (an LM) or "reward" (sequence classification, 1 label)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig,
                              LlamaConfig, Qwen3Config)

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).unlink(missing_ok=True)  # a half-written folder must not look complete

    tok = _build_tokenizer(family, max_position_embeddings, template)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    common = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        dtype="float32", **ids,
    )
    if head == "reward":
        common["num_labels"] = 1
    suffix = "ForSequenceClassification" if head == "reward" else "ForCausalLM"
    if family in ("teacher", "unlisted_end"):
        config = LlamaConfig(tie_word_embeddings=False, **common)
        config.architectures = [f"Llama{suffix}"]
    else:
        # Not Qwen2: transformers 5 forces Qwen2Tokenizer (byte-level, no BOS) on model_type
        # "qwen2" whatever tokenizer_config.json says, which would discard our tokenizer.
        config = Qwen3Config(tie_word_embeddings=head == "causal", **common)
        config.architectures = [f"Qwen3{suffix}"]

    torch.manual_seed(seed)
    if head == "reward":
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if family == "unlisted_end":
            _end_after_a_few_tokens(model, tok.convert_tokens_to_ids(UNLISTED_END))
        model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    args = _build_args(family, seed, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings,
                       template)
    if head != "causal":
        args["head"] = head
    (out / _MARKER).write_text(json.dumps(args, indent=2))
    return out


def _end_after_a_few_tokens(model, token_id: int) -> None:
    """Give a random Llama an output bias towards `token_id` (p ~ 0.2 per step at temperature 1, so
    sampled responses end after ~5 tokens). Llama's head has no bias, so make one: hidden dimension 0
    holds the same value in every token's embedding and no layer writes it, so after the final norm it
    is a near-constant input that only `token_id`'s output row reads."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.05
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        model.lm_head.weight[:, 0] = 0
        model.lm_head.weight[token_id, 0] = 4.0


def _build_args(family, seed, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings,
                template=None):
    return {"recipe_version": _RECIPE_VERSION, "family": family, "seed": seed, "hidden_size": hidden_size,
            "num_layers": num_layers, "num_heads": num_heads, "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings, "template": template}


def _is_built(out: pathlib.Path, args: dict) -> bool:
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER]
    if not all((out / name).is_file() for name in needed):
        return False
    try:
        return json.loads((out / _MARKER).read_text()) == args
    except (OSError, ValueError):
        return False


def build_demo_models(root) -> tuple[pathlib.Path, pathlib.Path]:
    """Build (or reuse) the demo teacher and student under `root`; returns (teacher_dir, student_dir)."""
    root = pathlib.Path(root)
    specs = [
        # a reasoning teacher: its generation prompt opens <think>, as DeepSeek-R1 distills do
        ("teacher", dict(family="teacher", seed=1, hidden_size=256, num_heads=4, num_layers=4, intermediate_size=512,
                         template="think")),
        ("student", dict(family="student", seed=2)),
    ]
    dirs = []
    for name, kw in specs:
        full = {"seed": 0, "hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256,
                "max_position_embeddings": 512, **kw}
        out = root / name
        if not _is_built(out, _build_args(**full)):
            build_tiny_model(out, **full)
        dirs.append(out)
    return dirs[0], dirs[1]


# ---------------------------------------------------------------- synthetic preference pairs

_WORDS = ["apple", "banana", "café", "naïve", "jalapeño", "über", "crème", "日本語", "rocket🚀", "student", "teacher"]
_FILLER = [
    "Let me think step by step.",
    "First, I read the question carefully.",
    "This is a simple task, so the answer is short.",
    "I checked the result twice to be sure.",
    "Here is the final answer.",
    "Thank you for the question!",
    "The capital of Japan is Tokyo, but that is not relevant here.",
    "Distillation transfers knowledge from a teacher to a student.",
]
_SYSTEMS = ["You are a helpful assistant.", "Answer briefly and correctly.", "Réponds en anglais, s'il te plaît."]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One (question, correct answer, slightly wrong answer) triple."""
    kind = rng.randrange(5)
    word = rng.choice(_WORDS)
    if kind == 0:
        good = word[::-1]
        bad = good[1:] + good[0] if len(set(good)) > 1 else good + good[0]
        return f"Reverse the word '{word}'.", good, bad
    if kind == 1:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-1, 1, 10]))
    if kind == 2:
        # Scripts without case (日本語) would make the "wrong" answer right: pick an English word.
        word = rng.choice([w for w in _WORDS if w.upper() != w.capitalize()])
        return f"Write '{word}' in upper case.", word.upper(), word.capitalize()
    if kind == 3:
        return f"How many characters are in '{word}'?", str(len(word)), str(len(word) + 1)
    return f"Repeat '{word}' twice, separated by a space.", f"{word} {word}", word


def _pad(rng: random.Random, answer: str) -> str:
    """Wrap a bare answer in 0-7 filler sentences, so lengths range from one word to ~60 words."""
    filler = rng.sample(_FILLER, rng.randint(0, 7))
    cut = rng.randint(0, len(filler))
    before, after = filler[:cut], filler[cut:]
    return " ".join(before + [f"The answer is {answer}." if before or after else answer] + after)


def make_tiny_pairs(n: int, seed: int = 0, reasoning: bool = False) -> list[dict]:
    """Deterministic TRL-style preference pairs: {id, prompt, chosen (teacher), rejected (student)}.

    Prompts are plain strings or message lists (optionally with a system message or an earlier
    exchange); answers are plain strings or a one-message assistant list, chosen at random.
    reasoning=True: the teacher's responses carry reasoning as a reasoning model writes it
    ("...</think>\n\nanswer", half of them with the "<think>\n" opener stored too), and earlier
    assistant turns of a prompt carry reasoning that their chat template strips.
    """
    rng = random.Random(seed)
    thoughts = random.Random(seed + 7919)  # a stream of its own: reasoning=False pairs stay as they were
    pairs = []
    for i in range(n):
        question, good, bad = _task(rng)
        style = rng.randrange(4)  # 0-1: string prompt, 2: messages, 3: messages with an earlier exchange
        if style < 2:
            prompt = question
        else:
            prompt = [{"role": "user", "content": question}]
            if style == 3:
                q0, a0, _ = _task(rng)
                if reasoning:
                    a0 = f"{thoughts.choice(_FILLER)}\n</think>\n\n{a0}"
                prompt = [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}] + prompt
            if rng.random() < 0.5:
                prompt = [{"role": "system", "content": rng.choice(_SYSTEMS)}] + prompt
        row = {"id": f"tiny-{seed}-{i:05d}", "prompt": prompt}
        for column, answer in (("chosen", good), ("rejected", bad)):
            text = _pad(rng, answer)
            if reasoning and column == "chosen":
                opener = "<think>\n" if thoughts.random() < 0.5 else ""
                text = f"{opener}{' '.join(thoughts.sample(_FILLER, 2))}\n</think>\n\n{text}"
            row[column] = [{"role": "assistant", "content": text}] if rng.random() < 0.4 else text
        pairs.append(row)
    return pairs


def make_tiny_prompts(n: int, seed: int = 1) -> list[dict]:
    """Held-out prompts of make_tiny_pairs' task with their answers: {id, prompt (one user turn), answer}.

    The same task generator drawn from its own seed (make_tiny_pairs' demo pairs use seed 0), so an
    eval asks new draws of the task; with few task kinds and words, some questions recur.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, good, _ = _task(rng)
        rows.append({"id": f"heldout-{seed}-{i:05d}", "prompt": question, "answer": good})
    return rows
