"""benchmarks/gpu_check.sh: its figures from hand-made records, and its CPU smoke mode end to end."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402


def test_training_figures_from_metrics_records():
    config = {"batch_size": 4, "block_size": 25, "grad_accum_steps": 2}  # 200 tokens a step
    records = [
        {"step": 0, "train_loss": 4.2, "val_loss": 4.3},
        {"step": 10, "loss": 3.0, "tokens_per_s": 2000.0, "mfu": 0.25},  # 10 steps in 1 s
        {"step": 20, "loss": 2.0, "tokens_per_s": 1000.0, "mfu": 0.125},  # 10 steps in 2 s
        {"step": 20, "train_loss": 2.1, "val_loss": 2.2},
        {"step": 25, "loss": 1.9, "tokens_per_s": 4000.0, "mfu": 0.5},
    ]  # 5 steps in 0.25 s
    figures = gpu_check.summarize_training(records, config)
    assert figures == dict(
        steps=25,
        training_s=pytest.approx(3.25),
        tokens_per_s=2000.0,
        mfu=0.25,
        final_val_loss=2.2,
        final_train_loss=2.1,
        best_val_loss=2.2,
        best_step=20,
    )
    assert gpu_check.summarize_training(records[:1] + records[3:4], config)["mfu"] is None


def test_ratios_and_goals():
    figures = {
        "train": {"tokens_per_s": 3.0e6, "training_s": 40.0, "process_s": 80.0},
        "torch_train": {"seed": {"tokens_per_s": 0.5e6}, "fused_compiled": {"tokens_per_s": 2.0e6}},
    }
    result = gpu_check.compare(figures)
    assert result["ratios"] == {"x_torch_seed": 6.0, "x_torch_fused_compiled": 1.5}
    assert {k: g["met"] for k, g in result["goals"].items()} == {
        "training_s": True,
        "process_s": False,
        "x_torch_fused_compiled": True,
    }
    assert {k: g["met"] for k, g in gpu_check.compare({"train": {"tokens_per_s": 1.0}})["goals"].items()} == {
        "training_s": None,
        "process_s": None,
        "x_torch_fused_compiled": None,
    }


def test_the_time_breakdown_line_of_a_run_is_read_back():
    from orpheus_jax.metrics import TimeBreakdown

    timer = TimeBreakdown(launched_at=0.0)
    timer.add("compile", 12.5)
    timer.add("training", 40.0)
    with timer.part("samples", background=True):
        pass
    line = timer.summary()
    parts = gpu_check.time_breakdown(f"step 5000: train loss 1.0\n{line}\nDone\n")
    assert parts["compile"] == 12.5 and parts["training"] == 40.0 and "beside_training:samples" in parts
    assert parts["launch_to_done"] == pytest.approx(
        sum(v for k, v in parts.items() if k.count(":") == 0 and k != "launch_to_done"), abs=0.2
    )


@pytest.mark.slow
def test_smoke_mode_runs_every_step_on_the_cpu(tmp_path, iliad_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, PYTHON=sys.executable, ORPHEUS_DATA=iliad_path, TMPDIR=str(tmp_path))
    result = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["mode"] == "smoke" and figures["machine"]["backend"] == "cpu"
    assert figures["machine"]["processor"]  # which CPU ran the host's side of the figures
    assert figures["train"]["steps"] == 10 and figures["train"]["mfu"] is None  # no peak for a CPU
    assert 0 < figures["train"]["final_val_loss"] < 4.3 and figures["train"]["training_s"] > 0
    assert figures["train"]["breakdown"]["launch_to_done"] > figures["train"]["breakdown"]["compile"] > 0
    assert {name: v["steps"] for name, v in figures["variants"].items()} == {"gather_deterministic": 6}
    assert figures["sample"] and all(r["value"] > 0 for r in figures["sample"])
    assert json.loads(result.stdout.strip().splitlines()[-1]) == figures
