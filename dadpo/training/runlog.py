"""RUN/metrics.jsonl, RUN/eval.jsonl and (with --report-to tensorboard) RUN/tb, main process only.

One JSON object per line, flushed as it is written. On resume, lines past the checkpoint's step
(logged before a crash) are dropped first, so no step appears twice; so is a torn last line (a
kill -9 or a full disk mid-append), which no checkpoint can need. Any other bad line is named.
"""

from __future__ import annotations

import json
from pathlib import Path

from dadpo.atomic import write_text_atomic
from dadpo.errors import DadpoError
from dadpo.errors import first_line


class RunLog:
    def __init__(self, out: Path, active: bool, start_step: int, tensorboard: bool):
        self.files, self.writer, self.active, self.last_train = {}, None, active, {}
        if not active:
            return
        for name in ("metrics", "eval"):
            path = Path(out) / f"{name}.jsonl"
            kept = []
            if start_step and path.exists():
                kept = [line for line, record in _records(path) if record["step"] <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            if name == "metrics" and kept:
                self.last_train = json.loads(kept[-1])
            self.files[name] = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / "tb"), purge_step=start_step + 1 if start_step else None)

    def _write(self, name: str, record: dict, prefix: str) -> None:
        if not self.active:
            return
        self.files[name].write(json.dumps(record) + "\n")
        self.files[name].flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, record["step"])
            self.writer.flush()

    def train(self, record: dict) -> None:
        self.last_train = record
        self._write("metrics", record, "train")

    def eval(self, step: int, metrics: dict) -> None:
        self._write("eval", {"step": step, **metrics}, "eval")

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        if self.writer:
            self.writer.close()


def check_logs(out: Path) -> None:
    """Before a resumed run changes anything: its logs read (a torn last line aside), or one line names
    the file and line that does not."""
    for name in ("metrics", "eval"):
        if (Path(out) / f"{name}.jsonl").exists():
            _records(Path(out) / f"{name}.jsonl")


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each logged step; an unparseable last line (torn mid-append) is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{path}: unreadable ({first_line(exc)}); it is the log --resume continues") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except ValueError as exc:
            if position == len(numbered) - 1:
                break  # torn while being written: that step is past any checkpoint anyway
            raise DadpoError(f"{path} line {number}: not a step record ({first_line(exc)}); fix or remove that line, "
                             "then --resume again") from None
        records.append((line, record))
    return records
