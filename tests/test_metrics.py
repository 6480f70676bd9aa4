import json
import math

from orpheus_jax.metrics import MetricsLog, read_jsonl


def test_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"), None)
    log.write(3, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    line = open(tmp_path / "m.jsonl").read()
    assert json.loads(line, parse_constant=lambda t: math.nan / 0) == {
        "step": 3,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
    }


def test_resume_drops_what_followed_the_checkpoint(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, None)
    for step in range(0, 50, 5):
        log.write(step, loss=1.0)
    with open(path, "a") as f:
        f.write('{"step": 50, "lo')  # a line torn by a kill
    MetricsLog(path, 20).write(25, loss=2.0)
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [
        (0, 1.0),
        (5, 1.0),
        (10, 1.0),
        (15, 1.0),
        (20, 1.0),
        (25, 2.0),
    ]
    MetricsLog(path, None)  # a fresh start (no checkpoint) keeps nothing
    assert read_jsonl(path) == []
