"""What a run reports about itself: metrics.jsonl, one strict-JSON object per line.

Each line carries "step" (optimizer steps taken) and some of: "loss", "grad_norm", "lr",
"tokens_per_s" (every log_interval steps), "train_loss", "val_loss" (every evaluation).
Non-finite numbers are written as null, so any JSON reader takes the file.
"""
import json
import math
import os

from orpheus_jax import WriteError, write_atomically


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics file; lines that are not JSON objects (a torn last line) are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class MetricsLog:
    """Appends records to <workdir>/metrics.jsonl; on resume, first drops what follows the checkpoint.

    path None: write nothing (the processes of a multi-process run other than process 0)."""

    def __init__(self, path: str | None, resume_step: int | None):
        self.path = path
        if path and os.path.exists(path):
            # A run killed after its last checkpoint logged steps that the resumed run logs again:
            # keep each step once. A fresh start (no checkpoint) keeps nothing.
            kept = [] if resume_step is None else [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            write_atomically(path, "".join(map(_line, kept)))

    def write(self, step: int, **values) -> None:
        if not self.path:
            return
        try:
            with open(self.path, "a") as f:
                f.write(_line(dict(step=step, **values)))
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {(e.strerror or str(e)).lower()}") from None


def _line(record: dict) -> str:
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"
