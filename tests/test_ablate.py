"""benchmarks/ablate.py: its runs, schedules and training time from hand-made records, and (slow) a
smoke run end to end."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import ablate  # noqa: E402


def test_runs_of_each_option_the_combination_and_muons_rates():
    args = ablate.parse_args(["--options", "baseline,rope,muon,combo", "--combo", "gelu,qk_norm,ema"])
    assert ablate.runs_of(args) == [
        ("baseline", "baseline", {}),
        ("rope", "rope", {"pos_encoding": "rope"}),
        ("muon", "muon", {"optimizer": "muon"}),
        ("combo", "combo", {"mlp_activation": "gelu", "qk_norm": True, "ema_decay": "auto"}),
    ]
    args = ablate.parse_args(["--options", "muon,combo", "--combo", "relu2,muon", "--muon_lrs", "0.01,0.04"])
    assert ablate.runs_of(args) == [  # one timing run per option: the rate does not change a step's cost
        ("muon@0.01", "muon", {"optimizer": "muon", "muon_learning_rate": 0.01}),
        ("muon@0.04", "muon", {"optimizer": "muon", "muon_learning_rate": 0.04}),
        ("combo@0.01", "combo", {"mlp_activation": "relu2", "optimizer": "muon", "muon_learning_rate": 0.01}),
        ("combo@0.04", "combo", {"mlp_activation": "relu2", "optimizer": "muon", "muon_learning_rate": 0.04}),
    ]
    assert [label for label, _, _ in ablate.runs_of(ablate.parse_args([]))] == [*ablate.OPTIONS, "combo"]


@pytest.mark.parametrize(
    "bad", [["--options", "swiglu"], ["--combo", "relu2,gelu"], ["--combo", "rope,combo"]]
)
def test_bad_options_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        ablate.parse_args(bad)
    assert "error:" in capsys.readouterr().err


def test_ema_decay_auto_averages_over_a_tenth_of_the_run():
    args = ablate.parse_args([])
    assert ablate.resolve(args, {"ema_decay": "auto", "qk_norm": True}, 2500) == {
        "ema_decay": 0.996,
        "qk_norm": True,
    }
    assert ablate.resolve(args, {"ema_decay": "auto"}, 500) == {"ema_decay": 0.98}
    assert ablate.resolve(ablate.parse_args(["--ema_decay", "0.999"]), {"ema_decay": "auto"}, 500) == {
        "ema_decay": 0.999
    }
    assert ablate.resolve(args, {"qk_norm": True}, 500) == {"qk_norm": True}


def test_the_schedule_fills_the_budget_with_evenly_spaced_evaluations():
    plan = ablate.schedule(ablate.parse_args(["--budget_s", "150", "--evals", "5"]), rate=4.0)  # 600 steps
    assert plan == dict(
        max_iters=600,
        eval_interval=120,
        checkpoint_interval=600,
        log_interval=5,
        warmup_iters=round(600 * 100 / 1200),  # the CPU preset's warmup share: 100 of its 1,200 steps
    )
    plan = ablate.schedule(ablate.parse_args(["--budget_s", "100", "--evals", "4"]), rate=1.37)  # 137 steps
    assert (plan["max_iters"], plan["eval_interval"]) == (140, 35)  # whole calls of 5 steps
    plan = ablate.schedule(ablate.parse_args(["--budget_s", "1", "--evals", "3"]), rate=1.0)
    assert (plan["max_iters"], plan["eval_interval"], plan["warmup_iters"]) == (15, 5, 1)


def test_training_time_from_the_log_windows(tmp_path):
    """A window runs from the previous record (a log line, or an evaluation, whose time it leaves out)."""
    (tmp_path / "config.json").write_text(
        json.dumps({"batch_size": 4, "block_size": 25, "grad_accum_steps": 2})
    )
    records = [  # 200 tokens a step
        {"step": 0, "train_loss": 4.2, "val_loss": 4.3},
        {"step": 5, "loss": 3.0, "tokens_per_s": 1000.0},  # 5 steps in 1 s
        {"step": 10, "loss": 2.5, "tokens_per_s": 500.0},  # 5 steps in 2 s
        {"step": 10, "train_loss": 2.6, "val_loss": 2.7},
        {"step": 15, "loss": 2.0, "tokens_per_s": 4000.0},  # 5 steps in 0.25 s
        {"step": 20, "loss": 1.9, "tokens_per_s": 2000.0},  # 5 steps in 0.5 s
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ablate.train_windows(str(tmp_path)) == [(5, 5, 1.0), (10, 5, 2.0), (15, 5, 0.25), (20, 5, 0.5)]


def test_the_table_gives_each_run_and_each_options_mean_over_the_seeds(capsys):
    args = ablate.parse_args(["--budget_s", "10", "--evals", "2", "--seeds", "1,2"])
    evals = lambda *vals: [dict(step=s, val_loss=v) for s, v in zip((0, 5, 10), vals)]
    result = lambda option, seed, final: dict(
        option=option, seed=seed, keys={}, evals=evals(4.2, 3.0, final), final_val=final, steps=10,
        tokens_per_s=1000, train_s=10.0, process_s=15.0, timing=option,
    )  # fmt: skip
    results = [result("baseline", 1, 2.5), result("rope", 1, 2.0)]
    results += [result("baseline", 2, 2.7), result("rope", 2, 2.2)]
    ablate.report(args, results, {"baseline": 1.0, "rope": 0.9})
    lines = capsys.readouterr().out.splitlines()
    table = [line.split() for line in lines if line.startswith("# ")]
    header = ["option", "seed", "val@5s", "val@10s", "final", "steps", "tok/s", "train_s", "proc_s"]
    assert table[1][1:] == header
    assert table[2][1:] == ["baseline", "1", "3.0000", "2.5000", "2.5000", "10", "1,000", "10.0", "15.0"]
    means = {row[1]: row[2:] for row in table[7:]}
    assert means == {
        "baseline": ["2.6000", "(2.5000", "..", "2.7000);", "1.00", "steps/s"],
        "rope": ["2.1000", "(2.0000", "..", "2.2000);", "0.90", "steps/s"],
    }
    records = [json.loads(line) for line in lines if not line.startswith("#")]
    assert len([r for r in records if r["metric"] == "val_loss"]) == 12
    assert [r["final_val"] for r in records if r["metric"] == "run"] == [2.5, 2.0, 2.7, 2.2]


@pytest.mark.slow
def test_a_smoke_run_prints_the_table_and_json(iliad_path, tmp_path):
    """One option, one seed, a tiny shape: a timing run and a timed run."""
    small = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "eval_iters=1"]
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "ablate.py"), "--budget_s", "4", "--seeds", "2",
         "--options", "rope", "--evals", "2", "--timing_steps", "20",
         "--cache", str(tmp_path / "cache"), "--keep", str(tmp_path / "runs"),
         *[x for kv in small for x in ("--set", kv)]],
        capture_output=True, text=True, timeout=600, env={**os.environ, "ORPHEUS_DATA": iliad_path},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line.split() for line in result.stdout.splitlines() if line.startswith("# ")]
    assert table[2][1:3] == ["rope", "2"]
    records = [json.loads(line) for line in result.stdout.splitlines() if not line.startswith("#")]
    (run,) = [r for r in records if r["metric"] == "run"]
    assert run["option"] == "rope" and run["keys"] == {"pos_encoding": "rope"}
    with open(tmp_path / "runs" / "rope-seed2" / "config.json") as f:
        assert json.load(f)["pos_encoding"] == "rope"  # the option reached train.py
    evals = [r for r in records if r["metric"] == "val_loss"]
    assert [e["step"] for e in evals] == [0, run["steps"] // 2, run["steps"]]
    assert evals[-1]["val_loss"] == run["final_val"] < evals[0]["val_loss"]  # it learned something
    assert 0 < evals[1]["train_s"] < evals[2]["train_s"] == run["train_s"]
    assert run["steps"] % 10 == 0 and run["tokens_per_s"] > 0
