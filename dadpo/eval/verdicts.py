"""The LM judge's protocol: the judge prompt (a versioned Jinja template), its verdict marks, and
the outcome of one prompt judged in both orders.

Every prompt is judged twice: first with the candidate as answer A and the baseline as answer B,
then swapped. The judge ends its reply with [[A]], [[B]] or [[C]] (a tie). The prompt is a win only
when both orders prefer the candidate, a loss only when both prefer the baseline, otherwise a tie
(FastChat's rule), so a judge that favours a position cannot turn that bias into wins.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.sandbox

from dadpo.errors import DadpoError

VERDICT_A, VERDICT_B, VERDICT_TIE = "A", "B", "C"
DEFAULT_TEMPLATE = "judge_prompt.v1.jinja"  # package data in dadpo/eval/
TEMPLATE_VARIABLES = ("question", "answer_a", "answer_b")

# [[A]], [[ b ]], [[C]]: whitespace inside the brackets and either case are tolerated.
_VERDICT_MARK = re.compile(r"\[\[\s*([ABCabc])\s*\]\]")


def parse_verdict(reply: str) -> str | None:
    """The last verdict mark in `reply` ("A", "B" or "C"), or None when it has none.

    The last one counts because judges often quote the format ("[[A]] if A is better...") before
    giving their own verdict at the end."""
    if not isinstance(reply, str):
        return None
    last = None
    for last in _VERDICT_MARK.finditer(reply):
        pass
    return last.group(1).upper() if last is not None else None


def _candidate_preference(verdict: str, candidate_is: str) -> int:
    """+1 the verdict prefers the candidate, -1 the baseline, 0 a tie."""
    if verdict == VERDICT_TIE:
        return 0
    if verdict not in (VERDICT_A, VERDICT_B):
        raise ValueError(f"not a verdict: {verdict!r} (expected 'A', 'B' or 'C')")
    return 1 if verdict == candidate_is else -1


def order_outcome(verdict_candidate_first: str | None, verdict_candidate_second: str | None) -> float | None:
    """One prompt's score from its two verdicts: in the first the candidate was answer A, in the
    second answer B. 1.0 (win) only if both prefer the candidate, 0.0 (loss) only if both prefer
    the baseline, else 0.5 (tie). None (a parse failure) if either verdict is missing."""
    if verdict_candidate_first is None or verdict_candidate_second is None:
        return None
    first = _candidate_preference(verdict_candidate_first, VERDICT_A)
    second = _candidate_preference(verdict_candidate_second, VERDICT_B)
    if first == second == 1:
        return 1.0
    if first == second == -1:
        return 0.0
    return 0.5


def orders_agree(verdict_candidate_first: str, verdict_candidate_second: str) -> bool:
    """Whether the two orders say the same thing about the answers (not about the positions): both
    prefer the same answer, or both call it a tie."""
    return (_candidate_preference(verdict_candidate_first, VERDICT_A)
            == _candidate_preference(verdict_candidate_second, VERDICT_B))


# ---------------------------------------------------------------- the judge prompt


@dataclass(frozen=True)
class JudgeTemplate:
    name: str     # DEFAULT_TEMPLATE, or the path of the user's --judge-template file
    text: str
    digest: str   # sha256 of text (hex)


@lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.SandboxedEnvironment:
    # Sandboxed: a template file may come from anyone. No autoescape: responses go in verbatim.
    # StrictUndefined: a name the judge does not provide is an error, not silently empty text.
    return jinja2.sandbox.SandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined,
                                               keep_trailing_newline=True)


def _jinja_problem(exc: Exception) -> str:
    line = getattr(exc, "lineno", None)
    message = " ".join(str(getattr(exc, "message", None) or exc).split())
    return f"line {line}: {message}" if line else message


def load_judge_template(path: str | None) -> JudgeTemplate:
    """The judge prompt template: the default (dadpo/eval/judge_prompt.v1.jinja) for None, else the
    file at `path`. Refused in one line naming the file: unreadable, not valid Jinja, missing one of
    question / answer_a / answer_b, or using a name the judge does not provide."""
    if path is None:
        name = DEFAULT_TEMPLATE
        text = resources.files("dadpo.eval").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise DadpoError(f"{name}: cannot read the judge template ({reason})") from None
    environment = _environment()
    try:
        parsed = environment.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise DadpoError(f"{name}: not a valid Jinja judge template ({_jinja_problem(exc)})") from None
    used = jinja2.meta.find_undeclared_variables(parsed)
    missing = [v for v in TEMPLATE_VARIABLES if v not in used]
    if missing:
        raise DadpoError(f"{name}: the judge template does not use {', '.join(missing)} (it must insert "
                         f"{', '.join(TEMPLATE_VARIABLES)})")
    unknown = sorted(used - set(TEMPLATE_VARIABLES) - set(environment.globals))
    if unknown:
        raise DadpoError(f"{name}: the judge template uses {', '.join(unknown)}, which the judge does not provide "
                         f"(only {', '.join(TEMPLATE_VARIABLES)})")
    try:
        _compiled(text)
    except jinja2.TemplateError as exc:
        raise DadpoError(f"{name}: not a valid Jinja judge template ({_jinja_problem(exc)})") from None
    return JudgeTemplate(name=name, text=text, digest=hashlib.sha256(text.encode("utf-8")).hexdigest())


@lru_cache(maxsize=16)
def _compiled(text: str) -> jinja2.Template:
    """Compiled once per template text: compiling costs milliseconds, rendering microseconds."""
    return _environment().from_string(text)


def render_judge_prompt(template: JudgeTemplate, question: str, answer_a: str, answer_b: str) -> str:
    """The judge prompt for one order. The three texts go in verbatim: Jinja never interprets the
    values it inserts, and nothing is escaped."""
    try:
        return _compiled(template.text).render(question=question, answer_a=answer_a, answer_b=answer_b)
    except jinja2.TemplateError as exc:
        raise DadpoError(f"{template.name}: the judge template failed to render ({_jinja_problem(exc)})") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise DadpoError(f"{template.name}: the judge template failed to render ({exc})") from None
