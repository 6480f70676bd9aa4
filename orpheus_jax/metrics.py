"""What a run reports about itself: metrics.jsonl, TensorBoard event files, the loss plot, and MFU.

Each record carries "step" (optimizer steps taken) and some of: "loss", "grad_norm", "lr",
"tokens_per_s", "mfu" (every log_interval steps), "train_loss", "val_loss" (every evaluation).
metrics.jsonl holds them as strict JSON, one object per line (non-finite numbers as null, so any
JSON reader takes the file). The same numbers go to TensorBoard event files, written with
tensorboardX (no TensorFlow), under the tags of TENSORBOARD_TAGS; so does text (the sample of every
evaluation), which only TensorBoard gets.
"""

import contextlib
import json
import math
import os
import re
import threading
import time

from orpheus_jax import WriteError
from orpheus_jax.fileio import atomic_file, os_reason, write_atomically

TENSORBOARD_TAGS = {
    "loss": "train/loss",  # the loss of the last batch before a log point
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "train_loss": "eval/train_loss",  # estimated over eval_iters batches
    "val_loss": "eval/val_loss",
    "sample": "eval/sample",  # text: TensorBoard lists it under eval/sample/text_summary
}

# Dense (no sparsity) bfloat16 matmul peaks per device, in TFLOP/s, from the vendors' data sheets,
# matched against jax.devices()[0].device_kind. T4 is left out on purpose: it has no bfloat16 tensor
# cores (its 65 TFLOP/s are float16), so no peak describes what a bfloat16 or float32 run asks of it.
PEAK_BF16_TFLOPS = (
    (r"^TPU v4$", 275),
    (r"^TPU v5( lite|e)$", 197),  # v5e reports "TPU v5 lite"
    (r"^TPU v5p?$", 459),
    (r"^TPU v6( lite|e)$", 918),  # v6e (Trillium) reports "TPU v6 lite"
    (r"\bH100\b.*\bPCIe\b", 756),
    (r"\bH100 NVL\b", 835),
    (r"\bH100\b", 989),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b", 989),
    (r"\bA100\b", 312),
    (r"\bL4\b", 121),
)


def peak_flops(device_kind: str) -> float | None:
    """One device's bfloat16 peak in FLOP/s, or None where we know none (CPU, unlisted devices)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return tflops * 1e12
    return None


def flops_per_token(cfg, n_matmul_params: int) -> int:
    """Model FLOPs to train on one token, as the PaLM paper's appendix counts them: 6N for the forward
    and backward matmuls (N = the parameters that multiply activations, model.matmul_params: not the
    embeddings, which are looked up), plus 12 * n_layer * block_size * n_embd for attention's scores
    and weighted sum over the full T x T square (as nanoGPT and PaLM count it; half is masked)."""
    return 6 * n_matmul_params + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def mfu(tokens_per_s: float, flops_per_token: int, devices) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed bfloat16 peak; None
    when the peak of devices[0].device_kind is unknown."""
    peak = peak_flops(devices[0].device_kind)
    return None if peak is None else tokens_per_s * flops_per_token / (peak * len(devices))


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
    """Appends records to <workdir>/metrics.jsonl and, given the directories, to TensorBoard event
    files and a loss plot. On resume it first drops what follows the checkpoint, in both.

    path None: write nothing (the processes of a multi-process run other than process 0)."""

    def __init__(
        self,
        path: str | None,
        resume_step: int | None,
        *,
        tensorboard_dir: str | None = None,
        plot_path: str | None = None,
    ):
        self.path, self.plot_path = path, plot_path
        self._lock = threading.Lock()  # the loss plot and the evaluation's sample are written from a thread
        if path and os.path.exists(path):
            # A run killed after its last checkpoint logged steps that the resumed run logs again:
            # keep each step once. A fresh start (no checkpoint) keeps nothing.
            kept = (
                []
                if resume_step is None
                else [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            )
            write_atomically(path, "".join(map(_line, kept)))
        try:
            self._events = _EventFile(tensorboard_dir, resume_step) if tensorboard_dir else None
        except OSError as e:
            raise WriteError(
                f"cannot write TensorBoard events in {tensorboard_dir}: {os_reason(e)}"
            ) from None

    def write(self, step: int, **values) -> None:
        """One record; values that are None (e.g. an MFU without a known peak) are left out."""
        if not self.path:
            return
        values = {k: v for k, v in values.items() if v is not None}
        try:
            with self._lock, open(self.path, "a") as f:
                f.write(_line(dict(step=step, **values)))
            if self._events:
                self._events.write(step, values)
        except OSError as e:
            raise WriteError(f"cannot write {e.filename or self.path}: {os_reason(e)}") from None

    def write_text(self, step: int, name: str, text: str) -> None:
        """Text for TensorBoard's Text tab (nothing without a tensorboard_dir)."""
        if self._events:
            try:
                with self._lock:
                    self._events.write(step, {name: text})
            except OSError as e:
                raise WriteError(f"cannot write {e.filename}: {os_reason(e)}") from None

    def plot(self) -> None:
        """Redraw the loss plot (if it has a path) from everything metrics.jsonl holds."""
        if self.plot_path:
            with self._lock:
                records = read_jsonl(self.path)
            plot_losses(
                {os.path.basename(os.path.dirname(os.path.abspath(self.path))): records}, self.plot_path
            )


class _EventFile:
    """TensorBoard events, written synchronously: each write is on disk when it returns, as the
    JSONL line is, so a run killed or exiting on an error loses nothing (tensorboardX's
    SummaryWriter queues events to a thread that only close() drains)."""

    def __init__(self, directory: str, resume_step: int | None):
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._summary, self._Event = summary, Event
        os.makedirs(directory, exist_ok=True)
        # A new file per (re)start; the suffix orders two starts within the same second.
        self._writer = EventsWriter(os.path.join(directory, "events"), f".{time.time_ns()}")
        # TensorBoard drops the events of earlier files from this step on (SummaryWriter's
        # purge_step): what a killed run logged after its checkpoint disappears, as from the JSONL.
        purge_step = 0 if resume_step is None else resume_step + 1
        self._writer.write_event(
            Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))
        )
        # The three losses on one chart (TensorBoard's "Custom Scalars" tab).
        layout = {
            "losses": {
                "train and val": [
                    "Multiline",
                    [TENSORBOARD_TAGS[k] for k in ("loss", "train_loss", "val_loss")],
                ]
            }
        }
        self._writer.write_event(Event(wall_time=time.time(), summary=summary.custom_scalars(layout)))
        self._writer.flush()

    def write(self, step: int, values: dict) -> None:
        now = time.time()
        for key, value in values.items():
            tag = TENSORBOARD_TAGS.get(key, key)
            # TensorBoard renders text as Markdown: a code block keeps a sample's line breaks.
            summary = (
                self._summary.text(tag, f"```\n{value}\n```")
                if isinstance(value, str)
                else self._summary.scalar(tag, value)
            )
            self._writer.write_event(self._Event(wall_time=now, step=step, summary=summary))
        self._writer.flush()


def plot_losses(runs: dict[str, list[dict]], path: str):
    """Train and val loss against steps, one colour per run, into a PNG (written atomically); returns
    the matplotlib Figure.

    runs: label -> metrics records. Each run draws its evaluations (val solid, train dashed, with
    markers) and, faintly, the loss of the last batch at each log line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        prefix = f"{label}: " if len(runs) > 1 else ""
        series = lambda key, records=records: [
            (r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
        ]
        batch, train, val = series("loss"), series("train_loss"), series("val_loss")
        if batch:
            ax.plot(*zip(*batch), color=color, alpha=0.3, linewidth=1, label=f"{prefix}train (logged batch)")
        if train:
            ax.plot(
                *zip(*train),
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{prefix}train (eval)",
            )
        if val:
            ax.plot(*zip(*val), color=color, marker="o", markersize=4, label=f"{prefix}val (eval)")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (cross-entropy, nats per character)")
    ax.set_title(next(iter(runs)) if len(runs) == 1 else "losses")
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}") from None
    return fig


def _line(record: dict) -> str:
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class TimeBreakdown:
    """Where a run's wall time went, by part (compile, training, evaluation, ...), for the line printed
    at its end. Parts measured on a background thread (the sample and plot of each evaluation) overlap
    the rest and are reported apart."""

    def __init__(self, launched_at: float):
        self.launched_at = launched_at  # time.perf_counter() when the process began its work
        self.seconds = {}
        self.background = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def part(self, name: str, background: bool = False):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                table = self.background if background else self.seconds
                table[name] = table.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> str:
        total = time.perf_counter() - self.launched_at
        parts = dict(self.seconds)
        parts["start-up and other"] = total - sum(parts.values())
        line = f"Time: {total:.1f} s from launch: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        if self.background:
            line += "; beside training: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.background.items())
        return line
