"""Answer match: is a response's final answer the reference answer? The one check behind
`dadpo eval --judge answer` and the replication's accuracy (benchmarks/replicate).

    final answer   the text after the last GSM8K marker '#### ', else the last \\boxed{...}, else what
                   follows the last 'the answer is' (up to the end of its line), else the last number
                   in the text (extract_final_answer). Against a non-numeric reference the whole
                   response stands in for a missing marker (a word answer has no "last number").
    normalised     case folded, whitespace collapsed, surrounding punctuation and '$' removed; in a
                   number, thousands commas dropped and a zero fraction dropped ('1,000.0' -> '1000').
    match          numeric when both sides are numbers: |a - b| <= 1e-6 * max(1, |b|);
                   otherwise the normalised texts are equal.
"""

from __future__ import annotations

import math
import re

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.*)", re.IGNORECASE)
# a signed integer or decimal, with optional thousands commas ("1,234.5", "-3", ".5")
_NUMBER_ONLY = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`()[]{}*$"


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced, so \\boxed{\\frac{1}{2}} keeps its inner braces)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no answer in the box


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER_ONLY.finditer(text)]


def _marked_answer(text: str) -> str | None:
    """The answer a response states explicitly ('#### X', '\\boxed{X}', 'the answer is X'), else None."""
    hashes = text.rfind("####")
    if hashes >= 0:
        rest = text[hashes + 4:].strip()
        return rest.splitlines()[0].strip() if rest else ""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        rest = matches[-1].group(1).strip()
        return rest.splitlines()[0].strip() if rest else ""
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response: after the last '#### ', in the last \\boxed{}, after the last
    'the answer is', else the last number in the text; None when there is none of these."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    """The value of a text that is one number (after normalisation), else None."""
    core = normalize_answer(text)
    if not _NUMBER_ONLY.fullmatch(core):
        return None
    value = float(core.replace(",", ""))
    return value if math.isfinite(value) else None


def normalize_answer(text: str) -> str:
    """Case folded, whitespace collapsed, surrounding punctuation and '$' removed; a number loses its
    thousands commas and a zero fraction ('$1,000.00.' -> '1000')."""
    text = " ".join(text.casefold().split()).strip(_EDGE_PUNCTUATION)
    if _NUMBER_ONLY.fullmatch(text):
        text = text.replace(",", "").lstrip("+")
        if "." in text:
            text = text.rstrip("0").rstrip(".") or "0"
        if text in ("-0", ""):
            text = "0"
    return text


def _reference(answer: str) -> str:
    """A reference may be a worked solution ending in '#### X' (GSM8K's answer column) or a boxed answer."""
    if "####" in answer or "\\boxed{" in answer:
        marked = _marked_answer(answer)
        if marked is not None:
            return marked
    return answer


def answers_match(response: str, answer: str) -> bool:
    """Does the response's final answer equal the reference `answer`? Numeric comparison when both are
    numbers (|a - b| <= 1e-6 * max(1, |b|)), else normalised exact match."""
    reference = _reference(answer)
    expected = _as_number(reference)
    if expected is not None:
        given = extract_final_answer(response)
        value = None if given is None else _as_number(given)
        if value is None and given is not None:
            numbers = _numbers(given)  # 'the answer is 42 apples' -> 42
            value = _as_number(numbers[-1]) if numbers else None
        return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))
    marked = _marked_answer(response)
    given = response if marked is None else marked
    return normalize_answer(given) == normalize_answer(reference)


def answer_outcome(candidate_response: str, baseline_response: str, answer: str) -> float:
    """1.0 when only the candidate is right, 0.0 when only the baseline is right, else 0.5 (a tie)."""
    candidate, baseline = answers_match(candidate_response, answer), answers_match(baseline_response, answer)
    if candidate == baseline:
        return 0.5
    return 1.0 if candidate else 0.0
