"""The reward-model judge (dadpo.eval.reward) on tiny locally built reward models, against plain
transformers: each conversation rendered by transformers' own apply_chat_template, run alone and
unpadded through the base model, and the score head applied to its last hidden state."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from dadpo.errors import DadpoError
from dadpo.eval.reward import RewardModel, is_reward_model, reward_outcome

ITEMS = [
    ("What is 12 + 30?", "The answer is 42."),
    ("Reverse the word 'apple'.", "elppa"),
    ([{"role": "system", "content": "Answer briefly and correctly."},
      {"role": "user", "content": "Write 'café' in upper case."}], "CAFÉ, of course. 🙂"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
      {"role": "user", "content": "Count the vowels in the word education."}],
     "Let me think step by step. First, I read the question carefully. There are five vowels."),
    ("Repeat 'über' twice.", "über über"),
    ("Say something.", "text with the end token <|endoftext|> inside it"),
    ("日本語のテキスト", ""),
]


def reference_reward(folder, prompt, response, **template_variables) -> float:
    """One conversation, alone and unpadded: transformers' chat template, base model, score head at the end."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False,
                                         **template_variables)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = model.model(input_ids=ids).last_hidden_state
        return float(model.score(hidden[0, -1]).double()[0])


@pytest.fixture(scope="module")
def references(reward_models) -> dict[str, np.ndarray]:
    return {family: np.array([reference_reward(reward_models[family], p, r) for p, r in ITEMS])
            for family in ("teacher", "student")}


@pytest.mark.parametrize("family", ["teacher", "student"])
def test_rewards_equal_unpadded_single_forward(reward_models, references, family):
    judge = RewardModel(str(reward_models[family]), dtype="float32")
    got = judge.rewards([p for p, _ in ITEMS], [r for _, r in ITEMS], batch_size=3)
    assert got.dtype == np.float64 and got.shape == (len(ITEMS),)
    np.testing.assert_allclose(got, references[family], rtol=1e-5, atol=1e-7)
    assert np.unique(np.round(got, 6)).size == len(ITEMS)  # the rewards really differ from item to item
    judge.close()


def test_batching_and_order_do_not_change_rewards(reward_models, references):
    judge = RewardModel(str(reward_models["teacher"]))
    order = [3, 0, 6, 5, 1, 4, 2]
    for batch_size in (1, 2, 7, 64):
        got = judge.rewards([ITEMS[i][0] for i in order], [ITEMS[i][1] for i in order], batch_size=batch_size)
        np.testing.assert_allclose(got, references["teacher"][order], rtol=1e-5, atol=1e-7)
    assert judge.rewards([], []).shape == (0,)


@pytest.fixture(scope="module")
def bare_reward_model(reward_models, tmp_path_factory):
    """The teacher reward model with no pad token anywhere, and a template whose turns end in the eos
    token itself: the last token of every conversation is the id padding would fall back to."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bare") / "reward"
    shutil.copytree(reward_models["teacher"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.chat_template = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + "
                               "message['content'] + '<|im_end|>' + eos_token -}}{%- endfor -%}")
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    return folder


def test_tokenizer_without_pad_token(bare_reward_model):
    judge = RewardModel(str(bare_reward_model))
    got = judge.rewards([p for p, _ in ITEMS], [r for _, r in ITEMS], batch_size=4)
    want = [reference_reward(bare_reward_model, p, r) for p, r in ITEMS]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reward_model_without_chat_template(reward_models, tmp_path):
    """No template: the prompt as raw text (with the tokenizer's BOS), then the response and eos."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "plain"
    shutil.copytree(reward_models["student"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not tokenizer.chat_template
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    items = [(p, r) for p, r in ITEMS if isinstance(p, str)]
    want = []
    for prompt, response in items:
        ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        assert ids[0] == tokenizer.bos_token_id
        with torch.inference_mode():
            want.append(float(model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])[0]))
    judge = RewardModel(str(folder))
    np.testing.assert_allclose(judge.rewards([p for p, _ in items], [r for _, r in items], batch_size=3), want,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(DadpoError, match="prompt 0: the prompt is a 3-message conversation"):
        judge.rewards([ITEMS[3][0]], [ITEMS[3][1]])


def test_pinned_date_reaches_the_template(reward_models):
    folder = reward_models["trim_date"]
    prompts, responses = [p for p, _ in ITEMS[:3]], [r for _, r in ITEMS[:3]]
    pinned = RewardModel(str(folder), date="2026-01-05").rewards(prompts, responses)
    want = [reference_reward(folder, p, r, date_string="05 Jan 2026") for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(pinned, want, rtol=1e-5, atol=1e-7)
    other = RewardModel(str(folder), date="2025-07-30").rewards(prompts, responses)
    assert not np.allclose(pinned, other, rtol=1e-5, atol=1e-7)


def test_is_reward_model(reward_models, models, tmp_path):
    assert is_reward_model(str(reward_models["teacher"])) and is_reward_model(str(reward_models["student"]))
    assert not is_reward_model(str(models["teacher"]))  # a causal LM
    assert not is_reward_model(str(tmp_path / "missing"))
    two = tmp_path / "two_labels"
    shutil.copytree(reward_models["teacher"], two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (two / "config.json").write_text(json.dumps(config))
    assert not is_reward_model(str(two))  # a classifier, not a scalar reward


def test_bad_inputs_are_one_line(reward_models, models):
    with pytest.raises(DadpoError, match="not a reward model") as error:
        RewardModel(str(models["teacher"]))
    assert "\n" not in str(error.value) and str(models["teacher"]) in str(error.value)
    judge = RewardModel(str(reward_models["teacher"]))
    with pytest.raises(DadpoError, match="2 prompts but 1 responses"):
        judge.rewards(["a", "b"], ["x"])
    with pytest.raises(DadpoError, match="prompt row-7: the conversation is .* tokens, over the 512 positions"):
        judge.rewards(["a", "b"], ["x", "word " * 600], ids=["row-6", "row-7"])
    with pytest.raises(DadpoError, match="--template-date 2026-13-01"):
        RewardModel(str(reward_models["teacher"]), date="2026-13-01")


def test_reward_outcome():
    assert reward_outcome(1.5, 1.5) == 0.5
    assert reward_outcome(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-15)
    assert reward_outcome(0.0, 2.0) == pytest.approx(1 - 1 / (1 + math.exp(-2.0)), rel=1e-12)
    assert reward_outcome(1000.0, -1000.0) == 1.0 and reward_outcome(-1000.0, 1000.0) == 0.0  # no overflow
    assert math.isnan(reward_outcome(float("nan"), 0.0))
