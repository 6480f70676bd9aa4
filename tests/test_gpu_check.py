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
    )
    assert gpu_check.summarize_training(records[:1] + records[3:4], config)["mfu"] is None


def test_ratios_and_goals():
    figures = {
        "train": {"tokens_per_s": 3.0e6, "training_s": 70.0},
        "torch_train": {"seed": {"tokens_per_s": 0.5e6}, "fused_compiled": {"tokens_per_s": 4.0e6}},
    }
    result = gpu_check.compare(figures)
    assert result["ratios"] == {"x_torch_seed": 6.0, "x_torch_fused_compiled": 0.75}
    assert {k: g["met"] for k, g in result["goals"].items()} == {
        "training_s": False,
        "x_torch_fused_compiled": False,
        "x_torch_seed": True,
    }
    assert {k: g["met"] for k, g in gpu_check.compare({"train": {"tokens_per_s": 1.0}})["goals"].items()} == {
        "training_s": None,
        "x_torch_fused_compiled": None,
        "x_torch_seed": None,
    }


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
    assert figures["train"]["steps"] == 10 and figures["train"]["mfu"] is None  # no peak for a CPU
    assert 0 < figures["train"]["final_val_loss"] < 4.3 and figures["train"]["training_s"] > 0
    assert (
        figures["train_nondeterministic"]["steps"] == 10 and figures["deterministic_tokens_per_s_ratio"] > 0
    )
    assert (
        set(figures["sample"]) == {"cached_float32_batch1"} and figures["sample"]["cached_float32_batch1"] > 0
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == figures
