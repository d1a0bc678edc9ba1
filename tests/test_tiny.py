"""Real (no mocks) checks of the tiny teacher/student builders and synthetic pairs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dadpo.tiny import (
    STUDENT_CHAT_TEMPLATE,
    TEACHER_CHAT_TEMPLATE,
    build_demo_models,
    build_tiny_model,
    make_tiny_pairs,
)

FAMILIES = ("teacher", "student")
ANSWER = "Sure! The answer is 42, café 日本語 🙂."
CONVERSATIONS = [
    [{"role": "user", "content": "What is 1 + 1?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse 'apple'."},
        {"role": "assistant", "content": "elppa"},
        {"role": "user", "content": "Now reverse 'naïve'."},
    ],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny_model(root / fam, family=fam, seed=3) for fam in FAMILIES}


@pytest.fixture(scope="module")
def toks(built):
    return {fam: AutoTokenizer.from_pretrained(built[fam]) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_loads_and_runs(built, toks, family):
    tok = toks[family]
    model = AutoModelForCausalLM.from_pretrained(built[family])
    cfg = model.config
    assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.vocab_size == len(tok)
    assert model.dtype == torch.float32
    assert cfg.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert cfg.bos_token_id == tok.bos_token_id == model.generation_config.bos_token_id
    ids = tok(["hello café", "a much longer input, with 日本語"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    # vLLM reads the plain files: architectures and safetensors weights.
    raw = json.loads((built[family] / "config.json").read_text())
    expected = {"teacher": "LlamaForCausalLM", "student": "Qwen3ForCausalLM"}[family]
    assert raw["architectures"] == [expected]
    assert (built[family] / "model.safetensors").is_file()


def test_families_differ(built, toks):
    assert toks["teacher"].get_vocab() != toks["student"].get_vocab()
    assert toks["teacher"].chat_template == TEACHER_CHAT_TEMPLATE
    assert toks["student"].chat_template == STUDENT_CHAT_TEMPLATE
    types = {fam: AutoConfig.from_pretrained(built[fam]).model_type for fam in FAMILIES}
    assert types["teacher"] != types["student"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_prompt_is_prefix(toks, family, messages):
    tok = toks[family]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert full.startswith(prompt)
    assert full[len(prompt):].startswith(ANSWER)
    for m in messages:
        assert m["content"] in prompt  # system messages are rendered too


def test_student_generation_prompt_ends_with_space(toks):
    prompt = toks["student"].apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<s>") and prompt.endswith("<|assistant|> ")


def test_bos_handling(toks):
    student, teacher = toks["student"], toks["teacher"]
    assert student("hi")["input_ids"][0] == student.bos_token_id
    assert student("hi", add_special_tokens=False)["input_ids"][0] != student.bos_token_id
    assert teacher.bos_token_id is None
    assert teacher("hi")["input_ids"] == teacher("hi", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family,special", [("teacher", "<|im_end|>"), ("teacher", "<|im_start|>"),
                                            ("student", "</s>"), ("student", "<s>"), ("student", "<|user|>")])
def test_template_specials_are_single_ids(toks, family, special):
    tok = toks[family]
    text = tok.apply_chat_template(CONVERSATIONS[2] + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special_id = tok.convert_tokens_to_ids(special)
    assert tok.convert_ids_to_tokens(special_id) == special
    assert ids.count(special_id) == text.count(special) > 0
    if family == "student":
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_unicode_roundtrip(toks, family):
    tok = toks[family]
    for text in ["café naïve 日本語 🙂🚀", "Ünïcödé never seen: ☃ Ω ж \t tab", "plain ascii, 12 + 30 = 42."]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids or tok.unk_token_id is None
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_deterministic_weights(tmp_path, built):
    again = build_tiny_model(tmp_path / "again", family="student", seed=3)
    other = build_tiny_model(tmp_path / "other", family="student", seed=4)
    a, b, c = (load_file(d / "model.safetensors") for d in (built["student"], again, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (built["student"] / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_demo_models_are_cached(tmp_path):
    teacher, student = build_demo_models(tmp_path)
    cfg = AutoConfig.from_pretrained(teacher)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (256, 4, 4, 512)
    assert AutoConfig.from_pretrained(student).hidden_size == 128
    stamp = (teacher / "model.safetensors").stat().st_mtime_ns
    assert build_demo_models(tmp_path) == (teacher, student)
    assert (teacher / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_make_tiny_pairs():
    pairs = make_tiny_pairs(200, seed=5)
    assert pairs == make_tiny_pairs(200, seed=5)
    assert pairs != make_tiny_pairs(200, seed=6)
    assert len({p["id"] for p in pairs}) == 200
    string_prompts = [p for p in pairs if isinstance(p["prompt"], str)]
    assert 60 < len(string_prompts) < 140
    conv = [p["prompt"] for p in pairs if isinstance(p["prompt"], list)]
    assert any(m[0]["role"] == "system" for m in conv)
    assert any(any(x["role"] == "assistant" for x in m) for m in conv)
    assert all(m[-1]["role"] == "user" for m in conv)

    def text(answer):
        if isinstance(answer, list):
            assert len(answer) == 1 and answer[0]["role"] == "assistant"
            return answer[0]["content"]
        return answer

    for col in ("chosen", "rejected"):
        assert any(isinstance(p[col], list) for p in pairs) and any(isinstance(p[col], str) for p in pairs)
    lengths = [len(text(p[col]).split()) for p in pairs for col in ("chosen", "rejected")]
    assert min(lengths) >= 1 and max(lengths) >= 30 and max(lengths) <= 80
    assert all(text(p["chosen"]).strip() and text(p["rejected"]).strip() for p in pairs)
    assert all(text(p["chosen"]) != text(p["rejected"]) for p in pairs)
    assert any(not text(p["chosen"]).isascii() for p in pairs)
