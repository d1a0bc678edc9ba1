"""`dadpo show-tokens` as a real subprocess, on the unlisted_end model (whose end of turn, <|end|>, is
special only in added_tokens_decoder): plain text in a pipe, the same text in colour when asked, the
pair picked by row or id, bad selections as one line; the tokens shown are checked against ids
written out here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dadpo.config import ShowTokensConfig
from dadpo.errors import DadpoError
from dadpo.show_tokens import render, show_tokens
from dadpo.tiny import UNLISTED_END, make_tiny_pairs
from dadpo.tokenization import vocab_digest
from support import assert_one_line_error, run_cli, write_jsonl

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def tokenizer(unlisted_end):
    return AutoTokenizer.from_pretrained(unlisted_end)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer) -> tuple[Path, list[dict]]:
    """Four text pairs, then one whose chosen carries sampled ids (its vocabulary's digest and <|end|>
    last) and whose rejected was cut at the length limit."""
    rows = make_tiny_pairs(4, seed=11)
    end = tokenizer.convert_tokens_to_ids(UNLISTED_END)
    rows.append({"id": "sampled", "prompt": "What is 2 + 2?", "chosen": "The answer is 4.",
                 "chosen_token_ids": tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"] + [end],
                 "chosen_token_ids_vocab": vocab_digest(tokenizer), "chosen_finish_reason": "stop",
                 "rejected": "The answer is", "rejected_finish_reason": "length"})
    return write_jsonl(tmp_path_factory.mktemp("show_tokens") / "pairs.jsonl", rows), rows


def show(model, pairs_path, *args):
    result = run_cli("show-tokens", "--model", model, "--pairs", pairs_path, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def line_after(output: str, label: str) -> str:
    lines = output.splitlines()
    heads = [k for k, line in enumerate(lines) if line.startswith(label)]
    assert heads, output
    return lines[heads[0] + 1].strip()


def bars(tokenizer, ids) -> str:
    """|tok|tok| from each id's own decoding (texts here have no |, newline or partial characters)."""
    return "|" + "|".join(tokenizer.decode([i]) for i in ids) + "|"


@pytest.fixture(scope="module")
def row_3(unlisted_end, pairs) -> str:
    return show(unlisted_end, pairs[0], "--row", "3")


def test_plain_in_a_pipe_with_the_end_token_after_each_response(row_3, pairs, tokenizer):
    path, rows = pairs
    out = row_3
    assert not ANSI.search(out)  # stdout is a pipe
    end = tokenizer.convert_tokens_to_ids(UNLISTED_END)
    pair = rows[3]
    for side in ("chosen", "rejected"):
        text = pair[side] if isinstance(pair[side], str) else pair[side][0]["content"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
        assert line_after(out, side) == bars(tokenizer, ids)
        assert f"{side}".ljust(14) + f"{len(ids)} tokens scored: the text's tokens + end of turn" in out
    assert line_after(out, "prompt tokens").endswith(f"|{UNLISTED_END}|\\n|<|assistant|>|\\n|")
    assert "    <|assistant|>" in out  # the rendered prompt, as text
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["end of turn"].split()[-2:] == [str(end), UNLISTED_END]
    assert f"{tokenizer.eos_token_id} <|endoftext|>, {end} {UNLISTED_END}" in lines["stop ids"]
    assert "pair          " + f"{path} row 3 id '{pair['id']}'" in out


def test_sampled_ids_and_cut_responses_say_so(unlisted_end, pairs, tokenizer):
    path, rows = pairs
    out = show(unlisted_end, path, "--id", "sampled")
    assert "row 4 id 'sampled'" in out
    assert f"chosen        {len(rows[4]['chosen_token_ids'])} tokens scored: the sampled ids" in out
    assert line_after(out, "chosen") == bars(tokenizer, rows[4]["chosen_token_ids"])
    cut = tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    assert f"rejected      {len(cut)} tokens scored: the text's tokens, no end of turn (cut at the length limit)" in out
    assert line_after(out, "rejected") == bars(tokenizer, cut)


def test_colour_when_asked_is_the_same_text(unlisted_end, pairs, row_3):
    coloured = show(unlisted_end, pairs[0], "--row", "3", "--color", "always")
    assert ANSI.search(coloured) and ANSI.sub("", coloured) == row_3


def test_the_first_pair_by_default(unlisted_end, pairs):
    path, rows = pairs
    config = ShowTokensConfig(model=str(unlisted_end), pairs=str(path))
    assert show_tokens(config).pair_id == rows[0]["id"]
    assert f"{path} row 0 id '{rows[0]['id']}'" in render(show_tokens(config))


def test_bad_selections_are_one_line(unlisted_end, pairs):
    path, _ = pairs
    assert_one_line_error(run_cli("show-tokens", "--model", unlisted_end, "--pairs", path, "--row", "9"),
                          "--row 9", str(path), "5 pairs")
    assert_one_line_error(run_cli("show-tokens", "--model", unlisted_end, "--pairs", path, "--id", "nope"),
                          "--id nope", str(path))
    for flags, message in (({"row": -1}, "--row -1"), ({"row": 1, "pair_id": "sampled"}, "--row 1 and --id sampled"),
                           ({"template_kwargs": "{"}, "--template-kwargs")):
        with pytest.raises(DadpoError, match=re.escape(message)):
            show_tokens(ShowTokensConfig(model=str(unlisted_end), pairs=str(path), **flags))
