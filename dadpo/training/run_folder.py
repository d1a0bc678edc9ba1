"""A training run's folder: what identifies the run, its logs, and whether it finished.

    RUN/train_config.json   every setting that decides the computation (written at start)
    RUN/metrics.jsonl       one line per optimizer step (dadpo.training.runlog)
    RUN/eval.jsonl, eval.json
    RUN/checkpoints/        dadpo.training.checkpoint
    RUN/model/ or adapter/  the final weights
    RUN/summary.json        written last, atomically: a run folder with a readable summary.json is
                            finished; one without (or with a damaged one) is not, whatever else it holds
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from dadpo.atomic import write_json_atomic
from dadpo.ownership import ensure_owned, read_json_object

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RECORD_NAME = "train_config.json"  # written first: the marker of a folder dadpo trains in


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    def finished_summary(self) -> dict | None:
        """The summary of a finished run; None for a run that never finished (or whose summary
        was damaged: such a run counts as unfinished and is trained again)."""
        return _read_json(self.summary_path)

    def record(self) -> dict | None:
        return _read_json(self.record_path)

    @staticmethod
    def removed(fresh: bool) -> list[str]:
        """What prepare() removes, in order: summary.json first (it marks a run finished)."""
        names = ["summary.json", "eval.json", MODEL_DIR, ADAPTER_DIR]
        return names + ([CHECKPOINTS_DIR, "tb", "metrics.jsonl", "eval.jsonl", "start_check.json"] if fresh else [])

    def check_owned(self, fresh: bool, reads: Mapping[str, str | None]) -> None:
        """Every process, before anything changes: refuse a non-empty folder that is not a dadpo run,
        and a run whose clearing would remove what it reads (`reads`: {"--model": folder, ...})."""
        ensure_owned(self.path, flag="--out", what="a dadpo training run", marker=RECORD_NAME, parse=_parse_record,
                     removes=self.removed(fresh), protected=reads)

    def prepare(self, fresh: bool) -> None:
        """Main process, before training: make the folder and make it stop looking finished. A fresh
        run also clears an earlier run's logs and checkpoints (refused earlier unless --overwrite).
        check_owned() said first that all of it is dadpo's."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in self.removed(fresh):
            target = self.path / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)

    def write_record(self, record: dict) -> None:
        write_json_atomic(self.record_path, record)

    def write_json(self, name: str, payload: dict) -> None:
        write_json_atomic(self.path / name, payload)

    def finish(self, summary: dict, eval_metrics: dict) -> None:
        write_json_atomic(self.path / "eval.json", eval_metrics)
        write_json_atomic(self.summary_path, summary)  # last: marks the run finished


def _parse_record(path: Path) -> dict | None:
    record = read_json_object(path, "run record")
    return record if "total_steps" in record else None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
