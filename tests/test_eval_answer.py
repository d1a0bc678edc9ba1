"""Answer match (dadpo.eval.answer) against hand-worked cases, and the replication's task checked the
way it always was (a stripped response equal to the answer)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from dadpo.eval.answer import answer_outcome, answers_match, extract_final_answer, normalize_answer

REPLICATE = Path(__file__).resolve().parents[1] / "benchmarks" / "replicate"


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,234\nextra words after the marker line", "1,234"),
    ("first #### 3 then #### 4", "4"),  # the last marker
    ("So the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{3} no, \\boxed{5}", "5"),
    ("We add them. The answer is 18.", "18."),
    ("The Answer is: Paris\nbecause it is the capital", "Paris"),
    ("I have 3 apples and then 7 more, 10 in all", "10"),
    ("It costs $-2.50 now", "-2.50"),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("  Paris. ", "paris"),
    ("$1,000.00", "1000"),
    ("1,234", "1234"),
    ("42.0", "42"),
    ("42.50", "42.5"),
    ("+7", "7"),
    ("-0.0", "0"),
    ("New   York\n City", "new york city"),
    ("(b)", "b"),
    ("dz.qk", "dz.qk"),  # punctuation inside an answer is part of it
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("She has 5 + 7 = 12 eggs.\n#### 12", "12", True),
    ("#### 12", "Natalia... 6 * 2 = 12\n#### 12", True),  # GSM8K's worked-solution reference
    ("The answer is 12 eggs.", "12", True),
    ("The answer is $1,200.", "1200", True),
    ("\\boxed{0.5}", "0.50", True),
    ("about 1000000.0000001", "1000000", True),  # within 1e-6 relative
    ("about 1000002", "1000000", False),
    ("I think 12, then again 13", "12", False),  # the last number counts
    ("twelve", "12", False),
    ("The answer is PARIS.", "Paris", True),
    ("Paris, founded in 250 BC", "Paris", False),
    ("dzqk", "dzqk", True),
    (" dzqk\n", "dzqk", True),
    ("dzqkx", "dzqk", False),
    ("dzq", "dzqk", False),
])
def test_answers_match(response, answer, expected):
    assert answers_match(response, answer) is expected


def test_answer_outcome():
    assert answer_outcome("#### 4", "#### 5", "4") == 1.0
    assert answer_outcome("#### 5", "#### 4", "4") == 0.0
    assert answer_outcome("#### 4", "4", "4") == 0.5  # both right
    assert answer_outcome("#### 3", "#### 5", "4") == 0.5  # both wrong


def test_replicate_task_checked_as_before():
    """The replication compared a stripped response with the answer exactly; its responses (answers,
    wrong answers, cut or run-on answers, stray spaces, in lower case as the models are trained) are
    judged the same by answers_match."""
    sys.path.insert(0, str(REPLICATE))
    try:
        import task
    finally:
        sys.path.remove(str(REPLICATE))
    rng = random.Random(0)
    checked = 0
    for example in task.make_split(200, seed=5):
        answer = example["answer"]
        wrong = task.wrong_answer(rng, example)
        for response in (answer, f" {answer}\n", wrong, answer[:-1], answer + rng.choice(task.LETTERS),
                         answer[::-1], "", " ".join(answer), task.LETTERS[:len(answer)]):
            assert answers_match(response, answer) == (response.strip() == answer), (response, answer)
            checked += 1
    for a, b in [(12, 30), (99, 1)]:  # the task's "add" kind: numbers compare by value, as their text did
        total = str(a + b)
        for response in (total, total + "1", str(a + b + 1), f" {total} "):
            assert answers_match(response, total) == (response.strip() == total)
            checked += 1
    assert checked > 1000
