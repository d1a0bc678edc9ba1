"""The held-out prompts of an eval: read once through dadpo's prompts reader (dadpo.pairs.load_prompts:
the same formats, ids and checks as `dadpo generate`), with the optional `answer` (for --judge answer)
and `category` (for the per-category rates) columns.

The digest covers every row's id and prompt (the reader's content fingerprint, whatever the file
format) plus the answers and categories, so a changed prompts file is caught by the eval's guard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dadpo.errors import DadpoError
from dadpo.pairs import decode_prompt, load_prompts


@dataclass(frozen=True)
class EvalPrompts:
    path: str
    digest: str
    ids: list[str]
    prompts: list  # per row: a list of {role, content} messages, or raw text
    answers: list[str | None] | None  # None when the file has no `answer` column
    categories: list[str | None] | None  # None when the file has no `category` column

    def __len__(self) -> int:
        return len(self.ids)

    def question(self, index: int) -> str:
        """The prompt as the judge reads it: one turn's text as it is; several turns as 'role: text' paragraphs."""
        return prompt_text(self.prompts[index])


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def load_eval_prompts(path: str, scratch: Path | None = None) -> EvalPrompts:
    """Read and check --prompts; DadpoError (one line, naming the file and row) on bad input."""
    if not Path(path).exists():
        raise DadpoError(f"--prompts {path}: no such file")
    folder = Path(tempfile.mkdtemp(prefix=".prompts.", dir=scratch)) if scratch else Path(tempfile.mkdtemp())
    try:
        loaded = load_prompts(path, workdir=folder)
        table = pl.read_parquet(loaded.file)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if table.height == 0:
        raise DadpoError(f"--prompts {path}: no prompts")
    answers = _text_column(table, "answer", path)
    categories = _text_column(table, "category", path)
    digest = hashlib.sha256(loaded.fingerprint.encode())
    digest.update(json.dumps([answers, categories], ensure_ascii=False).encode())
    return EvalPrompts(str(path), digest.hexdigest(), table["id"].to_list(),
                       [decode_prompt(p) for p in table["prompt"]], answers, categories)


def _text_column(table: pl.DataFrame, name: str, path: str) -> list | None:
    if name not in table.columns:
        return None
    values = []
    for row_id, value in zip(table["id"], table[name].to_list()):
        if value is not None and not isinstance(value, (str, int, float)):
            raise DadpoError(f"--prompts {path} id {row_id!r}: {name!r} must be text or a number, "
                             f"got {type(value).__name__}")
        values.append(None if value is None else str(value))
    return values
