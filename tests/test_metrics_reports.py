"""metrics.jsonl, TensorBoard event files (read back with TensorBoard's own reader), the loss plot, MFU."""

import json
import os
import time
import types

import jax
import numpy as np
import pytest

from orpheus_jax import metrics
from orpheus_jax.metrics import MetricsLog, flops_per_token, mfu, peak_flops, plot_losses, read_jsonl


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA L4", 121),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("cpu", None),
        ("Tesla T4", None),
        ("NVIDIA L40S", None),
        ("TPU v4 lite", None),
        ("TPU v7x", None),
    ],
)
def test_peak_by_device_kind(kind, tflops):
    assert peak_flops(kind) == (None if tflops is None else tflops * 1e12)


def test_mfu_divides_by_the_peak_of_all_devices():
    tpus = [types.SimpleNamespace(device_kind="TPU v5 lite")] * 4
    assert mfu(2.0e6, 5.0e7, tpus) == pytest.approx(2.0e6 * 5.0e7 / (4 * 197e12))
    assert mfu(2.0e6, 5.0e7, jax.devices()) is None  # the CPU: no peak, no MFU


def test_flops_per_token_is_close_to_what_xla_counts():
    """PaLM's 6N + 12*L*T*d (N: the matmul parameters) against XLA's own FLOP count of one compiled train
    step (no dropout: its random bits would count as FLOPs). XLA also counts the one-hot embedding's
    products and the elementwise work, so it comes out a few percent higher."""
    from configs import tiny
    from orpheus_jax.model import GPTConfig, matmul_params
    from orpheus_jax.optim import hyperparams, make_optimizer
    from orpheus_jax.sharding import make_mesh
    from orpheus_jax.train import init_state, make_train_step

    cfg = tiny.get_config()
    cfg.update(n_layer=2, n_head=2, n_embd=128, block_size=64, batch_size=8, dropout=0.0, cpu_dots="xla")
    model_cfg, optimizer = GPTConfig.from_run_config(cfg, 66), make_optimizer(cfg)
    state = jax.eval_shape(lambda: init_state(cfg, model_cfg, optimizer))
    step = make_train_step(cfg, model_cfg, make_mesh(jax.devices()[:1]))
    cost = (
        step.lower(state, jax.ShapeDtypeStruct((10_000,), np.int32), 1, hyperparams(cfg))
        .compile()
        .cost_analysis()
    )
    xla_per_token = (cost[0] if isinstance(cost, list) else cost)["flops"] / (cfg.batch_size * cfg.block_size)
    estimate = flops_per_token(cfg, matmul_params(state.params))
    assert 0.93 < estimate / xla_per_token < 1.0, (estimate, xla_per_token)


def test_tensorboard_events_and_jsonl_agree_and_resume_drops_later_steps(tmp_path, read_events):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, None, tensorboard_dir=str(tmp_path))
    for step in range(0, 25, 5):
        log.write(step, loss=10.0 - step, lr=1e-3, tokens_per_s=1000.0 + step, mfu=None)
    log.write(20, train_loss=1.5, val_loss=float("nan"))
    log.write_text(20, "sample", "Achilles\nsang")
    # Killed after step 20, resumed from the checkpoint at step 10: steps 15 and 20 come again.
    log = MetricsLog(path, 10, tensorboard_dir=str(tmp_path))
    log.write(15, loss=0.5, lr=1e-3, tokens_per_s=7.0)
    log.write(20, train_loss=0.25, val_loss=0.375)
    log.write_text(20, "sample", "Hector")

    scalars, texts = read_events(tmp_path)
    assert scalars["train/loss"] == [(0, 10.0), (5, 5.0), (10, 0.0), (15, 0.5)]
    assert scalars["perf/tokens_per_s"] == [(0, 1000.0), (5, 1005.0), (10, 1010.0), (15, 7.0)]
    assert scalars["eval/train_loss"] == [(20, 0.25)] and scalars["eval/val_loss"] == [(20, 0.375)]
    assert "perf/mfu" not in scalars  # None: not measured, not written
    assert texts["eval/sample/text_summary"] == [(20, "```\nHector\n```")]
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_jsonl(path)] == [
        (0, 10.0, None),
        (5, 5.0, None),
        (10, 0.0, None),
        (15, 0.5, None),
        (20, None, 0.375),
    ]
    # A fresh start in the same directory (no checkpoint) hides everything that came before.
    MetricsLog(path, None, tensorboard_dir=str(tmp_path)).write(0, loss=4.0)
    assert {tag: v for tag, v in read_events(tmp_path)[0].items() if v} == {"train/loss": [(0, 4.0)]}


def test_nan_is_null_in_jsonl_and_text_goes_to_tensorboard_only(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, None)
    log.write(3, loss=float("nan"))
    log.write_text(3, "sample", "x")  # no tensorboard_dir: nowhere
    assert json.loads(open(path).read()) == {"step": 3, "loss": None}


def test_plot_draws_each_runs_losses(tmp_path):
    a = [
        {"step": 0, "train_loss": 4.2, "val_loss": 4.3},
        {"step": 5, "loss": 3.0, "lr": 1e-3},
        {"step": 10, "loss": 2.5},
        {"step": 10, "train_loss": 2.4, "val_loss": 2.6},
    ]
    b = [{"step": 0, "train_loss": 4.1, "val_loss": 4.0}, {"step": 20, "train_loss": None, "val_loss": 1.9}]
    out = str(tmp_path / "losses.png")
    fig = plot_losses({"a": a, "b": b}, out)
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()
    }
    assert lines == {
        "a: train (logged batch)": ([5, 10], [3.0, 2.5]),
        "a: train (eval)": ([0, 10], [4.2, 2.4]),
        "a: val (eval)": ([0, 10], [4.3, 2.6]),
        "b: train (eval)": ([0], [4.1]),
        "b: val (eval)": ([0, 20], [4.0, 1.9]),
    }
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(lines)
    image = __import__("matplotlib.image").image.imread(out)
    assert image.shape[:2] == (550, 900) and not os.path.exists(out + ".tmp")


@pytest.mark.slow
def test_training_writes_mfu_where_the_peak_is_known(
    tiny_cfg, small_text_path, tmp_path, monkeypatch, read_events
):
    """The CPU has no peak: pretend it has 1 TFLOP/s and check the MFU of every log line against
    its tokens/s, over a 2-device mesh (so the peak counts twice)."""
    from orpheus_jax.model import GPTConfig, init_params, matmul_params
    from orpheus_jax.train import train

    monkeypatch.setattr(metrics, "peak_flops", lambda kind: 1e12 if kind == "cpu" else None)
    tiny_cfg.update(max_iters=10, eval_interval=10, checkpoint_interval=10)
    train(tiny_cfg, str(tmp_path), small_text_path, devices=jax.devices()[:2])
    logs = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "tokens_per_s" in r]
    vocab_size = json.load(open(tmp_path / "config.json"))["vocab_size"]
    params = init_params(GPTConfig.from_run_config(tiny_cfg, vocab_size), jax.random.key(0))
    n_matmul = sum(
        x.size for path, x in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"
    )
    assert n_matmul == matmul_params(params) < sum(x.size for x in jax.tree.leaves(params))  # no embeddings
    per_token = 6 * n_matmul + 12 * tiny_cfg.n_layer * tiny_cfg.block_size * tiny_cfg.n_embd
    assert [r["step"] for r in logs] == [5, 10]
    for r in logs:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 2e12)
    scalars, texts = read_events(tmp_path)
    assert [step for step, _ in scalars["perf/mfu"]] == [5, 10]
    assert [step for step, _ in texts["eval/sample/text_summary"]] == [0, 10]


@pytest.mark.slow
def test_a_compile_inside_the_loop_does_not_count_against_tokens_per_s(
    tiny_cfg, small_text_path, tmp_path, monkeypatch
):
    """Calls shorter than steps_per_call (here: to land on log_interval 2) compile inside the loop. A
    clock that jumps 1000 s during every compile shows whether that time enters a tokens/s window."""
    import types

    from orpheus_jax import train as train_lib

    offset = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])
    monkeypatch.setattr(train_lib, "time", clock)
    make_train_step = train_lib.make_train_step

    class SlowCompiles:
        def __init__(self, jitted):
            self.jitted = jitted

        def lower(self, *args):
            lowered = self.jitted.lower(*args)
            return types.SimpleNamespace(
                compile=lambda: (offset.__setitem__(0, offset[0] + 1000), lowered.compile())[1]
            )

    monkeypatch.setattr(train_lib, "make_train_step", lambda *a: SlowCompiles(make_train_step(*a)))
    tiny_cfg.update(max_iters=8, steps_per_call=5, log_interval=2, eval_interval=8, checkpoint_interval=8)
    train_lib.train(tiny_cfg, str(tmp_path), small_text_path)
    rates = [r["tokens_per_s"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "tokens_per_s" in r]
    assert len(rates) == 4 and offset[0] == 2000  # the first call's compile (5 steps) and one of 2 steps
    tokens = tiny_cfg.batch_size * tiny_cfg.block_size * 2
    assert min(rates) > tokens / 100  # a window that held the 1000 s would be below tokens / 1000
