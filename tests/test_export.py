"""ONNX export: onnxruntime against JAX's model.forward and cached logits, the seed's file format,
and greedy text from ONNX Runtime alone against sample.py's."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from script_runner import assert_one_line_error, run

onnx = pytest.importorskip("onnx", reason="pip install -r requirements-export.txt")
ort = pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")

from orpheus_jax.export import decode_model, forward_model  # noqa: E402
from orpheus_jax.model import GPTConfig, empty_buffers, forward, forward_cached, init_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "".join(chr(ord("!") + i) for i in range(13))


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def model_and_params(**options):
    c = GPTConfig(vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, block_size=16, **options)
    # Larger than init weights: logits of a few units, so 1e-4 is a real bound.
    return c, jax.tree.map(lambda a: a * 4, init_params(c, jax.random.key(0)))


VARIANTS = {
    "learned/embd": dict(pos_encoding="learned", attn_scale="embd"),
    "learned/head": dict(pos_encoding="learned", attn_scale="head"),
    "sinusoidal/head": dict(pos_encoding="sinusoidal", attn_scale="head"),
    "sinusoidal/embd": dict(pos_encoding="sinusoidal", attn_scale="embd"),
    "relu2": dict(mlp_activation="relu2"),
    "gelu": dict(mlp_activation="gelu"),
    "qk_norm": dict(qk_norm=True),
    "rope": dict(pos_encoding="rope"),
    "rope+qk_norm+gelu/embd": dict(
        pos_encoding="rope", qk_norm=True, mlp_activation="gelu", attn_scale="embd"
    ),
}
DECODE_VARIANTS = [name for name in VARIANTS if name != "sinusoidal/embd"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_graph_matches_jax(variant):
    c, params = model_and_params(**VARIANTS[variant])
    sess = session(forward_model(c, params, CHARS))
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (2, 7), (3, 16), (5, 13)):
        tokens = rng.integers(0, c.vocab_size, (batch, length))
        got = sess.run(["output"], {"input": tokens})[0]
        want = np.asarray(forward(c, params, tokens.astype(np.int32)))
        diff = np.abs(got - want).max()
        print(
            f"{variant} batch {batch} x {length}: max |onnxruntime - jax| = {diff:.2e} "
            f"(logits up to {np.abs(want).max():.1f})"
        )
        assert got.shape == (batch, length, c.vocab_size) and got.dtype == np.float32
        assert diff < 1e-4


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_prefill_and_step_match_jax(variant):
    c, params = model_and_params(**VARIANTS[variant])
    prefill, step = (
        session(decode_model(c, params, CHARS, step=False)),
        session(decode_model(c, params, CHARS, step=True)),
    )
    past_names = [i.name for i in step.get_inputs()][2:]
    assert past_names == [f"past.{i}.{kv}" for i in range(c.n_layer) for kv in ("key", "value")]
    B, L, prompt_len = 2, c.block_size, 5
    tokens = np.random.default_rng(1).integers(0, c.vocab_size, (B, L))
    full = np.asarray(forward(c, params, tokens.astype(np.int32)))
    logits, *kv = prefill.run(None, {"input": tokens[:, :prompt_len]})
    np.testing.assert_allclose(logits, full[:, :prompt_len], atol=1e-4, rtol=0)
    for t in range(prompt_len, L):  # every later position, one token at a time
        logits, *kv = step.run(
            None,
            {"input": tokens[:, t : t + 1], "position": np.array(t, np.int64), **dict(zip(past_names, kv))},
        )
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=0)
    # The buffers are the sampler's cache (with rope: the rotated keys), laid out (B, H, L, K) instead of
    # (B * H, L, K).
    _, cache = forward_cached(c, params, tokens.astype(np.int32), empty_buffers(c, B), 0)
    for got, want in zip(kv, [x for layer in cache for x in layer]):
        np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "option", [dict(mlp_activation="swiglu"), dict(pos_encoding="alibi"), dict(attn_scale="none")]
)
def test_an_option_the_graphs_cannot_express_is_refused_in_one_line(option):
    from orpheus_jax import OrpheusError

    c, params = model_and_params()
    c = dataclasses.replace(c, **option)
    ((key, value),) = option.items()
    for build in (
        forward_model,
        lambda *a: decode_model(*a, step=False),
        lambda *a: decode_model(*a, step=True),
    ):
        with pytest.raises(OrpheusError) as error:
            build(c, params, CHARS)
        message = str(error.value)
        assert "\n" not in message and f"{key}={value!r}" in message and "ONNX" in message


@pytest.mark.slow
def test_export_py_writes_the_seeds_file_format(tiny_run, tmp_path):
    from orpheus_jax.checkpoint import load_run

    path = str(tmp_path / "orpheus.onnx")
    result = run("export.py", "--workdir", tiny_run, "--onnx", path, "--decode")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["orpheus.onnx", "orpheus.prefill.onnx", "orpheus.step.onnx"]
    run_ = load_run(tiny_run)
    model = onnx.load(path)
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == (
        "input",
        onnx.TensorProto.INT64,
        ["batch_size", "sequence_length"],
    )
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == (
        "output",
        onnx.TensorProto.FLOAT,
        ["batch_size", "sequence_length", run_.tokenizer.vocab_size],
    )
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert json.loads(sess.get_modelmeta().custom_metadata_map["vocab"]) == run_.tokenizer.chars
    for batch, length in ((1, 32), (4, 9)):
        tokens = np.random.default_rng(batch).integers(0, run_.tokenizer.vocab_size, (batch, length))
        diff = np.abs(
            sess.run(None, {"input": tokens})[0] - np.asarray(forward(run_.model_cfg, run_.params, tokens))
        ).max()
        print(f"tiny run, batch {batch} x {length}: max |onnxruntime - jax| = {diff:.2e}")
        assert diff < 1e-4


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, iliad_path):
    """The seed fixture's weights as a run: a random-looking model whose greedy text is not a loop at once."""
    from configs import orpheus_seed
    from orpheus_jax.seed_import import import_seed

    workdir = str(tmp_path_factory.mktemp("seed") / "run")
    import_seed(
        os.path.join(REPO, "tests", "fixtures", "seed_model.pth"),
        workdir,
        iliad_path,
        orpheus_seed.get_config(),
    )
    return workdir


@pytest.fixture(scope="module")
def options_run(small_text_path, tmp_path_factory) -> str:
    """conftest's tiny_run with rope, QK-norm, GELU and an average of the weights (which load_run, so
    sample.py and the export, use): 100 steps at a high rate, so that its greedy text is not one loop."""
    from configs import tiny
    from orpheus_jax.train import train

    cfg = tiny.get_config()
    cfg.update(
        max_iters=100, learning_rate=1e-2, min_lr=1e-3, steps_per_call=10, eval_interval=100,
        checkpoint_interval=100, log_interval=50, cpu_dots="xla", pos_encoding="rope", qk_norm=True,
        mlp_activation="gelu", ema_decay=0.9,
    )  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("options_run") / "run")
    train(cfg, workdir, small_text_path)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_run", "seed_run", "options_run"])
def test_greedy_text_from_onnx_runtime_equals_sample_py(which, request, tmp_path, iliad_path):
    workdir = request.getfixturevalue(which)
    path = str(tmp_path / "m.onnx")
    assert run("export.py", "--workdir", workdir, "--onnx", path, "--decode").returncode == 0
    block_size = json.load(open(os.path.join(workdir, "config.json")))["block_size"]
    with open(iliad_path, encoding="utf-8") as f:
        prompt = f.read(2000)[-(block_size + 7) :]  # longer than the buffer: both keep its last block_size
    n = 4 * block_size  # the buffers fill and refill (every block_size // 2 characters) several times
    ours = run(
        "examples/onnx_generate.py",
        "--prefill",
        str(tmp_path / "m.prefill.onnx"),
        "--step",
        str(tmp_path / "m.step.onnx"),
        "--prompt",
        prompt,
        "--max_new_tokens",
        str(n),
    )
    theirs = run(
        "sample.py",
        "--workdir",
        workdir,
        "--prompt",
        prompt,
        "--max_new_tokens",
        str(n),
        "--temperature",
        "0",
    )
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout
    assert len(ours.stdout) == len(prompt) + n + 1 and len(set(ours.stdout[len(prompt) :])) > 2


@pytest.mark.slow
def test_export_py_errors_are_one_line(tmp_path):
    result = run("export.py", "--workdir", str(tmp_path / "none"), "--onnx", str(tmp_path / "m.onnx"))
    assert_one_line_error(result, f"no such workdir: {tmp_path / 'none'}")
