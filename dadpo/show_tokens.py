"""`dadpo show-tokens`: what one model will score for one pair, before any GPU hour is spent on it.

The pair is read by the pairs reader (dadpo.pairs) and tokenized by the tokenization rule
(dadpo.tokenization.ModelTokenizer.encode_pair), exactly as generate, sft and cache-teacher do; this
module only lays the result out:

    prompt      the text the chat template rendered (or the raw text) and its tokens
    chosen      the response's tokens, the end of turn last, and where they came from (the sampled
    rejected    ids, or the text's tokens + end of turn, or the text alone when cut at the length limit)
    end of turn the ids appended after a response's text
    stop ids    the ids at which generation stops, each with its string

show_tokens() returns a TokenView; render() turns it into text, with ANSI colours when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from dadpo.config import ShowTokensConfig
from dadpo.errors import DadpoError
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.pairs import decode_prompt, load_pairs
from dadpo.tokenization import check_date, pair_responses, parse_template_kwargs, special_ids, today


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # how it is shown: its own text, control characters escaped
    kind: str  # "text", "special" (marked special by the tokenizer), "end" (the end of turn / stop token)


@dataclass(frozen=True)
class ResponseView:
    side: str  # "chosen" or "rejected"
    tokens: tuple[Token, ...]
    source: str  # where the ids came from (sampled ids, text + end of turn, text cut at the length limit)


@dataclass(frozen=True)
class TokenView:
    model: str  # "--model NAME"
    pairs: str  # the pairs source as given
    row: int  # 0-based row in the pairs file
    pair_id: str
    mode: str  # "chat template" or "plain (no chat template)"
    template_date: str | None  # the date pinned for a template that writes today's date
    prompt_text: str  # what the model reads before its response, as one string
    prompt: tuple[Token, ...]
    chosen: ResponseView
    rejected: ResponseView
    end_of_turn: tuple[Token, ...]
    stop_ids: tuple[Token, ...]


def show_tokens(cfg: ShowTokensConfig) -> TokenView:
    """The tokens `cfg.model` scores for the pair at `cfg.row` (or with id `cfg.pair_id`) of `cfg.pairs`."""
    if cfg.row is not None and cfg.pair_id is not None:
        raise DadpoError(f"--row {cfg.row} and --id {cfg.pair_id}: give one of them")
    if cfg.row is not None and cfg.row < 0:
        raise DadpoError(f"--row {cfg.row}: must be a row number >= 0")
    check_date(cfg.template_date)
    kwargs = parse_template_kwargs(cfg.template_kwargs, "--template-kwargs")
    pairs = load_pairs(cfg.pairs, split=cfg.pairs_split, prompt_format=cfg.prompt_format)
    index, row = _pick(pairs, cfg.row, cfg.pair_id)
    rule = model_tokenizer(resolve_model(cfg.model, cfg.revision, "--model"), "--model",
                           no_chat_template=cfg.no_chat_template, template_kwargs=kwargs,
                           template_date=cfg.template_date or today(), trust_remote_code=cfg.trust_remote_code)
    chosen, rejected = pair_responses(row)
    where = f"{pairs.source} row {index} id '{row['id']}'"
    prompt_ids, chosen_ids, rejected_ids = rule.encode_pair(decode_prompt(row["prompt"]), chosen, rejected, where)
    specials = special_ids(rule.tokenizer)

    def tokens(ids, end: int = 0) -> tuple[Token, ...]:
        """`end`: how many trailing ids are the end of turn."""
        kinds = ["end" if k >= len(ids) - end else "special" if i in specials else "text" for k, i in enumerate(ids)]
        return tuple(Token(i, _shown(rule, i, kind == "text"), kind) for i, kind in zip(ids, kinds))

    def response(side: str, sampled, ids: list[int]) -> ResponseView:
        eot = list(rule.end_of_turn)
        if sampled.token_ids is not None and tuple(ids) == tuple(sampled.token_ids):
            end = 1 if ids[-1] in rule.stop_ids else 0
            source = "the sampled ids" + ("" if end else f" (no stop token: {sampled.finish_reason})")
        elif sampled.finish_reason == "length":
            end, source = 0, "the text's tokens, no end of turn (cut at the length limit)"
        else:
            end, source = len(eot), "the text's tokens + end of turn"
        return ResponseView(side, tokens(ids, end), source)

    return TokenView(
        model=rule.name, pairs=pairs.source, row=index, pair_id=row["id"],
        mode="chat template" if rule.chat else "plain (no chat template)", template_date=rule.template_date,
        prompt_text=rule.decode(prompt_ids), prompt=tokens(prompt_ids),
        chosen=response("chosen", chosen, chosen_ids), rejected=response("rejected", rejected, rejected_ids),
        end_of_turn=tokens(rule.end_of_turn, len(rule.end_of_turn)),
        stop_ids=tokens(rule.stop_ids, len(rule.stop_ids)))


def _pick(pairs, row: int | None, pair_id: str | None) -> tuple[int, dict]:
    if pair_id is not None:
        ids = pairs.read(["id"])["id"].to_list()
        if pair_id not in ids:
            raise DadpoError(f"--id {pair_id}: {pairs.source} has no pair with this id")
        row = ids.index(pair_id)
    row = row or 0
    if row >= len(pairs):
        raise DadpoError(f"--row {row}: {pairs.source} has {len(pairs)} pair{'s' if len(pairs) != 1 else ''} "
                         f"(rows 0 to {len(pairs) - 1})")
    return row, pairs.slice(row, 1).row(0, named=True)


def _shown(rule, token_id: int, text_token: bool) -> str:
    """A token's own text with control characters escaped (and, in text tokens, the | that separates
    tokens); its vocabulary entry where the text alone is not valid UTF-8 (a byte of a longer character)."""
    text = rule.decode([token_id])
    if "\ufffd" in text:
        text = rule.tokenizer.convert_ids_to_tokens(token_id)
    escapes = _ESCAPES if text_token else {k: v for k, v in _ESCAPES.items() if k != "|"}
    return "".join(escapes.get(c, c) if c.isprintable() or c in escapes else f"\\x{ord(c):02x}" for c in text)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "|": "\\|", "\\": "\\\\"}


# ---- the text ----

_STYLES = {"text": ("36", "33"), "special": ("1;35",), "end": ("1;31",), "bar": ("2",), "label": ("1",)}


def render(view: TokenView, color: bool = False) -> str:
    """The view as text: each token list as |tok|tok|, tokens alternating in two colours (specials in
    magenta, the end of turn and stop tokens in red) when `color`; plain otherwise."""

    def paint(text: str, style: str) -> str:
        return f"\033[{style}m{text}\033[0m" if color else text

    def row_of(tokens) -> str:
        bar = paint("|", _STYLES["bar"][0])
        parts = []
        for k, token in enumerate(tokens):
            styles = _STYLES[token.kind]
            parts.append(paint(token.text, styles[k % len(styles)]))
        return bar + bar.join(parts) + bar if parts else "(none)"

    def ids_of(tokens) -> str:
        return ", ".join(f"{t.id} {paint(t.text, _STYLES[t.kind][0])}" for t in tokens) or "(none)"

    def head(name: str) -> str:
        return paint(name, _STYLES["label"][0]) + " " * max(1, 14 - len(name))

    date = f", template date {view.template_date}" if view.template_date else ""
    lines = [f"{head('model')}{view.model} ({view.mode}{date})",
             f"{head('pair')}{view.pairs} row {view.row} id '{view.pair_id}'",
             f"{head('prompt')}{len(view.prompt)} tokens; the text the model reads:"]
    text_lines = view.prompt_text.split("\n")
    lines += [f"    {line}" for line in (text_lines[:-1] if len(text_lines) > 1 and not text_lines[-1] else text_lines)]
    lines += [paint("prompt tokens", _STYLES["label"][0]), f"    {row_of(view.prompt)}"]
    for response in (view.chosen, view.rejected):
        lines += [f"{head(response.side)}{len(response.tokens)} tokens scored: {response.source}",
                  f"    {row_of(response.tokens)}"]
    lines += [f"{head('end of turn')}{ids_of(view.end_of_turn)}", f"{head('stop ids')}{ids_of(view.stop_ids)}"]
    return "\n".join(lines)
