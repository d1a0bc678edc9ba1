"""An eval folder on disk: its settings guard, the judgments kept as they complete, the final files.

    EVAL/settings.json               what the judgments depend on: the baseline, the judge (kind, model,
                                     template digest, reply length...), the prompts' digest
    EVAL/responses/NAME.parquet      each model's responses (dadpo.eval.responses)
    EVAL/work/judgments-*.parquet    judgments, appended as they complete: one small file per write,
                                     each written atomically, so kill -9 loses only those in flight
    EVAL/judgments.parquet           all judgments, one row per (prompt id, model, order)
    EVAL/summary.json, summary.md, winrates.png [, sweep heatmaps]

A judgment's key is (id, model, order); order is "AB" (the model's response is answer A, the
baseline's B), "BA" (the reverse), "reward" (a reward model's score of the model's response) or
"answer" (1 when its final answer matches the prompt's, else 0).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.atomic import sweep_temp_files, write_json_atomic, write_parquet_atomic
from dadpo.errors import DadpoError
from dadpo.ownership import ensure_owned, read_json_object

FORMAT = "dadpo.eval.v1"
SCHEMA = pa.schema([("id", pa.string()), ("model", pa.string()), ("order", pa.string()), ("reply", pa.string()),
                    ("verdict", pa.string()), ("attempts", pa.int32()), ("score", pa.float64())])
# what --overwrite may delete: only the files an eval writes
_OWN = ("settings.json", "responses", "work", "lm_eval", "judgments.parquet", "summary.json", "summary.md",
        "winrates.png")
_GUARDED = ("baseline", "judge", "prompts")


def open_eval(out: Path, settings: dict, overwrite: bool, reads: dict | None = None) -> dict:
    """Create or continue EVAL; returns the settings it holds. Refuses (one line) a folder made with
    another judge, template, baseline or prompts, a non-empty folder no eval made (the ownership rule,
    dadpo.ownership), and an --overwrite that would remove what the eval reads (reads: {flag: path})."""
    out = Path(out)
    settings_file = out / "settings.json"
    if out.exists() and not out.is_dir():
        raise DadpoError(f"--out {out}: is a file, expected an eval folder")
    ensure_owned(out, flag="--out", what="a dadpo eval folder", marker=settings_file.name,
                 parse=lambda path: read_json_object(path, "eval settings").get("format") == FORMAT or None,
                 removes=_OWN if overwrite else (), protected=list((reads or {}).items()))
    if overwrite and settings_file.exists():
        for name in _OWN[1:]:
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for extra in out.glob("sweep_heatmap*.png"):
            extra.unlink()
        settings_file.unlink()
    if settings_file.exists():
        try:
            existing = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DadpoError(f"--out {out}: settings.json is unreadable; pass --overwrite to start over") from None
        changed = changed_settings(existing, settings)
        if changed:
            raise DadpoError(f"--out {out}: made with another {', '.join(changed)}; pass --overwrite to start over, "
                             "or choose another --out")
        (out / "work").mkdir(exist_ok=True)
        sweep_temp_files(out / "work")
        return existing
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / "responses").mkdir(exist_ok=True)
    write_json_atomic(settings_file, settings)
    return settings


def changed_settings(existing: dict, wanted: dict) -> list[str]:
    """The guarded settings that differ, as dotted names (judge.model, prompts.digest)."""
    names = []
    for key in _GUARDED:
        a, b = existing.get(key) or {}, wanted.get(key) or {}
        names += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return names


class JudgmentStore:
    """Judgments on disk: the finished ones (read once), and new ones appended in atomic files."""

    def __init__(self, out: Path):
        self.work = Path(out) / "work"
        self.final = Path(out) / "judgments.parquet"
        self._counter = itertools.count()
        self.rows: dict[tuple[str, str, str], dict] = {}
        for path in ([self.final] if self.final.exists() else []) + sorted(self.work.glob("judgments-*.parquet")):
            try:
                table = pq.read_table(path, schema=SCHEMA)
            except (pa.ArrowException, OSError) as exc:
                raise DadpoError(f"{path}: unreadable ({exc}); pass --overwrite to start over") from None
            for row in table.to_pylist():
                self.rows[(row["id"], row["model"], row["order"])] = row

    def done(self, key: tuple[str, str, str]) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        """Keep `rows` (dicts with the SCHEMA's fields) on disk before returning."""
        if not rows:
            return
        name = f"judgments-{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}.parquet"
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), self.work / name)
        for row in rows:
            self.rows[(row["id"], row["model"], row["order"])] = row

    def finish(self) -> Path:
        """All judgments into EVAL/judgments.parquet (sorted), then the work files are removed."""
        rows = sorted(self.rows.values(), key=lambda r: (r["model"], r["id"], r["order"]))
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), self.final)
        for path in self.work.glob("judgments-*.parquet"):
            path.unlink()
        return self.final
