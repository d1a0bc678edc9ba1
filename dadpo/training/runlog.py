"""RUN/metrics.jsonl, RUN/eval.jsonl and (with --report-to tensorboard) RUN/tb, main process only.

One JSON object per line, flushed as it is written. On resume, lines past the checkpoint's step
(logged before a crash) are dropped first, so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from dadpo.atomic import write_text_atomic


class RunLog:
    def __init__(self, out: Path, active: bool, start_step: int, tensorboard: bool):
        self.files, self.writer, self.active, self.last_train = {}, None, active, {}
        if not active:
            return
        for name in ("metrics", "eval"):
            path = Path(out) / f"{name}.jsonl"
            kept = []
            if start_step and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= start_step]
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
