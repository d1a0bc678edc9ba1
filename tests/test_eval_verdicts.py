"""The LM judge's protocol: verdict marks, the two-order outcome, the judge prompt template."""

from __future__ import annotations

import hashlib
import itertools
import os
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dadpo.errors import DadpoError
from dadpo.eval.verdicts import (DEFAULT_TEMPLATE, JudgeTemplate, load_judge_template, order_outcome, orders_agree,
                                 parse_verdict, render_judge_prompt)


# ---------------------------------------------------------------- parse_verdict


@pytest.mark.parametrize("reply, verdict", [
    ("A is more precise. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good.\n\nFinal verdict: [[C]]", "C"),
    # The last mark wins: judges quote the format before giving their own verdict.
    ('Output "[[A]]" if A is better, "[[B]]" if B is better. My verdict: [[B]]', "B"),
    ("[[C]] at first sight, but on reflection [[A]]", "A"),
    # Whitespace inside the brackets, either case.
    ("verdict: [[ a ]]", "A"),
    ("[[\tB\n]]", "B"),
    ("[[c]]", "C"),
    # No verdict at all.
    ("", None),
    ("I cannot decide.", None),
    ("[A]", None),
    ("[[D]]", None),
    ("[[AB]]", None),
    ("[ [A] ]", None),
    ("[[A]", None),
    ("A]]", None),
    # A malformed mark after a real one does not hide it.
    ("[[B]] ... [[X]]", "B"),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


MARKS = st.sampled_from(["[[A]]", "[[B]]", "[[C]]", "[[a]]", "[[ b ]]", "[[\nC\t]]", "[[", "]]", "[", "]", "[[D]]",
                         "[[AB]]", "A", "B", "C", " ", "\n", "verdict:"])


def _last_mark_by_hand(reply: str) -> str | None:
    """The rule read by hand: every "[[", optional whitespace, one of A B C (any case), optional
    whitespace, "]]"; the one that starts last."""
    found = None
    for i in range(len(reply)):
        if not reply.startswith("[[", i):
            continue
        j = i + 2
        while j < len(reply) and reply[j].isspace():
            j += 1
        if j < len(reply) and reply[j] in "ABCabc":
            k = j + 1
            while k < len(reply) and reply[k].isspace():
                k += 1
            if reply.startswith("]]", k):
                found = reply[j].upper()
    return found


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(st.text(max_size=20), MARKS), max_size=12).map("".join))
def test_parse_verdict_never_fails_and_agrees_with_a_scan_by_hand(reply):
    """Any reply gives A, B, C or None, never an exception, and the same as the scan by hand."""
    verdict = parse_verdict(reply)
    assert verdict in {"A", "B", "C", None}
    assert verdict == _last_mark_by_hand(reply)


@given(st.text())
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_parse_verdict_of_text_with_a_verdict_appended(text):
    assert parse_verdict(text + " [[B]]") == "B"


# ---------------------------------------------------------------- the two orders


# first: the candidate is answer A; second: the candidate is answer B.
# +1 = prefers the candidate, -1 = prefers the baseline, 0 = tie.
FIRST = {"A": 1, "B": -1, "C": 0}
SECOND = {"A": -1, "B": 1, "C": 0}
TRUTH = {  # (first verdict, second verdict): outcome
    ("A", "B"): 1.0,  # both orders prefer the candidate
    ("B", "A"): 0.0,  # both prefer the baseline
    ("A", "A"): 0.5,  # always the first position: position bias, a tie
    ("B", "B"): 0.5,  # always the second position
    ("C", "C"): 0.5,
    ("A", "C"): 0.5, ("C", "B"): 0.5,  # one order for the candidate, the other a tie: not a win
    ("B", "C"): 0.5, ("C", "A"): 0.5,  # one order against, the other a tie: not a loss
}


@pytest.mark.parametrize("first, second", list(TRUTH))
def test_order_outcome_truth_table(first, second):
    assert order_outcome(first, second) == TRUTH[(first, second)]
    assert orders_agree(first, second) == (FIRST[first] == SECOND[second])


def test_order_outcome_covers_every_pair_and_agreement_matches_the_table():
    assert set(TRUTH) == set(itertools.product("ABC", repeat=2))
    agreeing = {pair for pair in TRUTH if orders_agree(*pair)}
    assert agreeing == {("A", "B"), ("B", "A"), ("C", "C")}


@pytest.mark.parametrize("first, second", [(None, "A"), ("B", None), (None, None)])
def test_order_outcome_with_a_missing_verdict_is_a_parse_failure(first, second):
    assert order_outcome(first, second) is None


def test_order_outcome_refuses_what_is_not_a_verdict():
    with pytest.raises(ValueError, match="not a verdict"):
        order_outcome("D", "A")


# ---------------------------------------------------------------- the judge template


def test_default_template():
    template = load_judge_template(None)
    text = resources.files("dadpo.eval").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    assert template == JudgeTemplate(DEFAULT_TEMPLATE, text, hashlib.sha256(text.encode()).hexdigest())
    prompt = render_judge_prompt(template, "What is 2+2?", "It is 4.", "Five.")
    for mark in ("[[A]]", "[[B]]", "[[C]]"):
        assert mark in prompt
    assert prompt.index("What is 2+2?") < prompt.index("It is 4.") < prompt.index("Five.")
    assert "{" not in prompt and "dadpo's default judge prompt" not in prompt  # the comment is not sent


TRICKY = [
    "{{ answer_b }} {% if true %}x{% endif %} {# not a comment #}",  # Jinja syntax inside a response
    "<b>&amp; \"quotes\" 'single'</b>",                              # nothing escaped
    "line one\r\nline two\n\n\n",                                    # newlines kept as they are
    "  leading and trailing spaces  ",
    "\u00e9\u4e2d\U0001f600 \\n \\\\ $1 %s {0}",
]


@pytest.mark.parametrize("text", TRICKY)
def test_responses_are_inserted_verbatim(tmp_path, text):
    path = tmp_path / "judge.jinja"
    path.write_text("Q<{{ question }}>A<{{ answer_a }}>B<{{ answer_b }}>", encoding="utf-8")
    template = load_judge_template(str(path))
    assert template.name == str(path)
    rendered = render_judge_prompt(template, text, text + "a", "b" + text)
    assert rendered == f"Q<{text}>A<{text}a>B<b{text}>"
    default = render_judge_prompt(load_judge_template(None), "q", text, "other")
    assert f"\n{text}\n" in default


def test_template_digest_follows_the_text(tmp_path):
    first, second = tmp_path / "one.jinja", tmp_path / "two.jinja"
    first.write_text("{{question}} {{answer_a}} {{answer_b}}")
    second.write_text("{{question}}  {{answer_a}} {{answer_b}}")
    assert load_judge_template(str(first)).digest != load_judge_template(str(second)).digest
    assert load_judge_template(str(first)).digest == hashlib.sha256(first.read_bytes()).hexdigest()


def _one_line_error(path) -> str:
    with pytest.raises(DadpoError) as raised:
        load_judge_template(str(path))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_template_syntax_error(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{{ question }} {{ answer_a }}\n{% if answer_b %}{{ answer_b }}\n")
    assert "not a valid Jinja judge template" in _one_line_error(path)
    path.write_text("{{ question }} {{ answer_a }} {{ answer_b ")
    assert "line 1" in _one_line_error(path)


def test_template_missing_variables(tmp_path):
    path = tmp_path / "partial.jinja"
    path.write_text("Question: {{ question }}\nFirst: {{ answer_a }}\n")
    message = _one_line_error(path)
    assert "does not use answer_b" in message
    path.write_text("no variables at all")
    assert "does not use question, answer_a, answer_b" in _one_line_error(path)


def test_template_with_a_name_the_judge_does_not_provide(tmp_path):
    path = tmp_path / "extra.jinja"
    path.write_text("{{ question }} {{ answer_a }} {{ answer_b }} {{ reference_answer }}")
    assert "reference_answer" in _one_line_error(path)
    # Jinja's own globals and names the template sets itself are fine.
    path.write_text("{% set sep = '---' %}{% for i in range(2) %}{{ sep }}{% endfor %}"
                    "{{ question }} {{ answer_a }} {{ answer_b | upper }}")
    assert render_judge_prompt(load_judge_template(str(path)), "q", "a", "b") == "------q a B"


def test_template_unreadable(tmp_path):
    assert "cannot read the judge template" in _one_line_error(tmp_path / "absent.jinja")
    assert "cannot read the judge template" in _one_line_error(tmp_path)  # a folder
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ question }}\x80")
    assert "cannot read the judge template" in _one_line_error(binary)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jinja"
        locked.write_text("{{ question }} {{ answer_a }} {{ answer_b }}")
        locked.chmod(0)
        assert "cannot read the judge template" in _one_line_error(locked)


def test_template_error_at_render_time_names_the_template(tmp_path):
    path = tmp_path / "sandboxed.jinja"
    # Valid syntax, but the sandbox refuses reaching into Python internals when it runs.
    path.write_text("{{ question.__class__.__mro__[1].__subclasses__() }} {{ answer_a }} {{ answer_b }}")
    with pytest.raises(DadpoError, match=f"^{path}: the judge template failed to render"):
        render_judge_prompt(load_judge_template(str(path)), "q", "a", "b")
    path.write_text("{{ question }} {{ answer_a }} {{ answer_b }} {{ 1 // 0 }}")
    with pytest.raises(DadpoError, match="failed to render"):
        render_judge_prompt(load_judge_template(str(path)), "q", "a", "b")
