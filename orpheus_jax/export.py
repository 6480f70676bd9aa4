"""ONNX export of a run: the seed-compatible forward pass, and the cached decode (prefill + step).

The graphs are written node by node with `onnx.helper` from the run's parameters, op for op the
model of model.py (same layout, same masking by absolute position, LayerNorm epsilon 1e-5), so
ONNX Runtime needs nothing of JAX. Why not the alternatives: jax2onnx pins orbax-checkpoint below
our floor; `jax.export` writes StableHLO, which only JAX/XLA runs; a torch round trip needs torch.

forward (the seed's file):  input int64 [batch_size, sequence_length]
                            -> output float32 [batch_size, sequence_length, vocab]
prefill:  input int64 [batch_size, sequence_length]
          -> logits [batch_size, sequence_length, vocab], present.{i}.key / .value [batch_size, H, L, K]
step:     input int64 [batch_size, 1], position int64 [] (where input goes), past.{i}.key / .value
          -> logits [batch_size, 1, vocab], present.{i}.key / .value

L = block_size: like the sampler, the key/value buffers hold block_size positions; sequence_length
and position + 1 must not exceed it. Each file's metadata holds the vocabulary (JSON) and sizes.

The model options: relu2 is Relu then Mul, gelu the exact 0.5 x (1 + Erf(x / sqrt 2)) (opset 17 has
no Gelu); qk_norm multiplies queries and keys by 1 / Sqrt(ReduceMean(x * x) + 1e-6); rope rotates them
with cos and sin tables of the buffer's positions gathered by position (as the sinusoidal table is),
and the step graph's buffers hold the rotated keys, as the sampler's do. token_embedding, attention
and dtype change how JAX computes, not what: the graphs are the same (float32). A value `EXPRESSIBLE`
does not list is refused with OrpheusError (one line) before anything is written.
"""

import json

import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orpheus_jax import OrpheusError
from orpheus_jax.fileio import os_reason
from orpheus_jax.model import GPTConfig, rope_tables, sinusoidal_positions

OPSET = 17  # LayerNormalization
# What the graphs below can express, per config key that changes the function.
EXPRESSIBLE = {
    "pos_encoding": ("learned", "sinusoidal", "rope"),
    "attn_scale": ("head", "embd"),
    "mlp_activation": ("relu", "relu2", "gelu"),
    "qk_norm": (False, True),
}


def check_expressible(c: GPTConfig) -> None:
    """Raise OrpheusError if the run's model has an option these graphs cannot express."""
    for key, allowed in EXPRESSIBLE.items():
        value = getattr(c, key)
        if value not in allowed:
            raise OrpheusError(
                f"the ONNX export cannot express {key}={value!r} (it can: {', '.join(map(str, allowed))})"
            )


class _Graph:
    """Nodes and initializers, with generated names."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def const(self, array, name=None) -> str:
        self._count += 1
        name = name or f"const_{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, *inputs, out=None, **attrs) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def dense(self, x, p, kernel_2d=None, out=None) -> str:
        y = self.op(
            "MatMul",
            x,
            self.const(kernel_2d if kernel_2d is not None else p["kernel"]),
            out=None if "bias" in p else out,
        )
        return self.op("Add", y, self.const(p["bias"]), out=out) if "bias" in p else y

    def layer_norm(self, x, p) -> str:
        return self.op(
            "LayerNormalization", x, self.const(p["scale"]), self.const(p["bias"]), axis=-1, epsilon=1e-5
        )

    def last_axis(self, x, start: int, end: int) -> str:
        """x[..., start:end]."""
        ints = lambda v: self.const(np.array([v], np.int64))
        return self.op("Slice", x, ints(start), ints(end), ints(-1))

    def rms_norm(self, x) -> str:
        """model.rms_norm: x / sqrt(mean(x * x) + 1e-6) over the last axis (QK-norm)."""
        mean_square = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        inverse = self.op(
            "Reciprocal", self.op("Sqrt", self.op("Add", mean_square, self.const(np.float32(1e-6))))
        )
        return self.op("Mul", x, inverse)

    def rope(self, x_BHTK, cos_TI, sin_TI, head_size: int) -> str:
        """model.rope on [B, H, T, K]: the halves (x1, x2) become (x1 cos - x2 sin, x1 sin + x2 cos)."""
        half = head_size // 2
        x1, x2 = self.last_axis(x_BHTK, 0, half), self.last_axis(x_BHTK, half, head_size)
        first = self.op("Sub", self.op("Mul", x1, cos_TI), self.op("Mul", x2, sin_TI))
        second = self.op("Add", self.op("Mul", x1, sin_TI), self.op("Mul", x2, cos_TI))
        return self.op("Concat", first, second, axis=-1)

    def activation(self, name: str, x) -> str:
        """model.activation: relu, relu2 (relu squared) or the exact gelu, x * Phi(x)."""
        if name == "gelu":
            erf = self.op("Erf", self.op("Mul", x, self.const(np.float32(2**-0.5))))
            return self.op(
                "Mul",
                self.op("Mul", x, self.const(np.float32(0.5))),
                self.op("Add", erf, self.const(np.float32(1))),
            )
        relu = self.op("Relu", x)
        return self.op("Mul", relu, relu) if name == "relu2" else relu


def _f32(params):
    return {k: _f32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in params.items()}


def _block(g: _Graph, c: GPTConfig, p, x_BTD, pos_T, pos_S, rope_TI=None, write=None):
    """One transformer block. rope_TI: the (cos, sin) tables at the chunk's positions, with rope.
    write(name, new_BHTK) -> buffer_BHLK puts this chunk's keys or values into the layer's buffer
    (cached graphs) and names it; without it, attention stays within the chunk."""
    H, K, D = c.n_head, c.head_size, c.n_embd
    h_BTD = g.layer_norm(x_BTD, p["ln1"])
    heads = {}
    for name in ("query", "key", "value"):
        y_BTHK = g.op(
            "Reshape",
            g.dense(h_BTD, {}, p["attn"][name]["kernel"].reshape(D, H * K)),
            g.const(np.array([0, 0, H, K], np.int64)),
        )
        heads[name] = g.op("Transpose", y_BTHK, perm=[0, 2, 1, 3])  # B, H, T, K
    for name in ("query", "key"):  # as model.py: QK-norm, then the rotation
        if c.qk_norm:
            heads[name] = g.rms_norm(heads[name])
        if rope_TI is not None:
            heads[name] = g.rope(heads[name], *rope_TI, K)
    k_BHSK, v_BHSK = heads["key"], heads["value"]
    if write is not None:
        k_BHSK, v_BHSK = write("key", k_BHSK), write("value", v_BHSK)
    scale = c.head_size**-0.5 if c.attn_scale == "head" else c.n_embd**-0.5
    if write is None:
        scores_BHTS = g.op("MatMul", heads["query"], g.op("Transpose", k_BHSK, perm=[0, 1, 3, 2]))
    else:  # transpose the query and the scores, not the whole buffer: at one query they are tiny
        scores_BHST = g.op("MatMul", k_BHSK, g.op("Transpose", heads["query"], perm=[0, 1, 3, 2]))
        scores_BHTS = g.op("Transpose", scores_BHST, perm=[0, 1, 3, 2])
    scores_BHTS = g.op("Mul", scores_BHTS, g.const(np.float32(scale)))
    # Causal by absolute position, as model.py: keys past the query (unwritten or stale) are masked too.
    visible_TS = g.op(
        "LessOrEqual",
        g.op("Unsqueeze", pos_S, g.const(np.array([0], np.int64))),
        g.op("Unsqueeze", pos_T, g.const(np.array([1], np.int64))),
    )
    scores_BHTS = g.op("Where", visible_TS, scores_BHTS, g.const(np.float32(np.finfo(np.float32).min)))
    out_BHTK = g.op("MatMul", g.op("Softmax", scores_BHTS, axis=-1), v_BHSK)
    out_BTD = g.op(
        "Reshape", g.op("Transpose", out_BHTK, perm=[0, 2, 1, 3]), g.const(np.array([0, 0, D], np.int64))
    )
    x_BTD = g.op(
        "Add", x_BTD, g.dense(out_BTD, p["attn"]["proj"], p["attn"]["proj"]["kernel"].reshape(H * K, D))
    )
    h_BTF = g.activation(c.mlp_activation, g.dense(g.layer_norm(x_BTD, p["ln2"]), p["mlp"]["fc"]))
    return g.op("Add", x_BTD, g.dense(h_BTF, p["mlp"]["out"]))


def _embed(g: _Graph, c: GPTConfig, params, input_BT, pos_T) -> tuple[str, tuple | None]:
    """The embedded chunk, and rope's (cos, sin) at its positions (None without rope)."""
    x_BTD = g.op("Gather", g.const(params["wte"]["embedding"]), input_BT)
    positions_L = jnp.arange(c.block_size)  # the positions a buffer can hold
    if c.pos_encoding == "rope":
        tables = (np.asarray(t, np.float32) for t in rope_tables(positions_L, c.head_size))
        return x_BTD, tuple(g.op("Gather", g.const(table_LI), pos_T) for table_LI in tables)
    if c.pos_encoding == "learned":
        table_LD = params["wpe"]["embedding"]
    else:  # the same table model.py computes
        table_LD = np.asarray(sinusoidal_positions(positions_L, c.n_embd), np.float32)
    return g.op("Add", x_BTD, g.op("Gather", g.const(table_LD), pos_T)), None


def _model(g, name, graph_inputs, outputs, metadata) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, graph_inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="orpheus_jax"
    )
    model.ir_version = 8  # readable by ONNX Runtime >= 1.11
    helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model)
    return model


def _metadata(c: GPTConfig, chars: str) -> dict:
    return {
        "vocab": json.dumps(chars),
        "block_size": c.block_size,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "head_size": c.head_size,
    }


def forward_model(c: GPTConfig, params, chars: str) -> onnx.ModelProto:
    """The seed's export: logits for every position of every row."""
    check_expressible(c)
    g, params = _Graph(), _f32(params)
    seq_len = g.op("Gather", g.op("Shape", "input"), g.const(np.int64(1)))
    pos_T = g.op("Range", g.const(np.int64(0)), seq_len, g.const(np.int64(1)))
    x_BTD, rope_TI = _embed(g, c, params, "input", pos_T)
    for i in range(c.n_layer):
        x_BTD = _block(g, c, params[f"block_{i}"], x_BTD, pos_T, pos_T, rope_TI)
    g.dense(g.layer_norm(x_BTD, params["ln_f"]), params["lm_head"], out="output")
    tokens = helper.make_tensor_value_info("input", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info(
        "output", TensorProto.FLOAT, ["batch_size", "sequence_length", c.vocab_size]
    )
    return _model(g, "orpheus_forward", [tokens], [out], _metadata(c, chars))


def decode_model(c: GPTConfig, params, chars: str, *, step: bool) -> onnx.ModelProto:
    """prefill (step=False): a prompt into empty buffers; step: one token at `position`, given the buffers."""
    check_expressible(c)
    g, params = _Graph(), _f32(params)
    H, L, K = c.n_head, c.block_size, c.head_size
    buffer_shape = ["batch_size", H, L, K]
    shape_BT = g.op("Shape", "input")
    start = (
        g.op("Reshape", "position", g.const(np.array([1], np.int64)))
        if step
        else g.const(np.array([0], np.int64))
    )
    seq_len = g.op(
        "Slice", shape_BT, g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))
    )  # [1]
    pos_T = g.op(
        "Range", g.op("Squeeze", start), g.op("Squeeze", g.op("Add", start, seq_len)), g.const(np.int64(1))
    )
    pos_S = g.const(np.arange(L, dtype=np.int64))
    if not step:  # the prompt goes into empty buffers
        batch = g.op("Slice", shape_BT, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)))
        zeros_BHLK = g.op(
            "ConstantOfShape",
            g.op("Concat", batch, g.const(np.array([H, L, K], np.int64)), axis=0),
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        )
    graph_inputs = [
        helper.make_tensor_value_info(
            "input", TensorProto.INT64, ["batch_size", 1 if step else "sequence_length"]
        )
    ]
    if step:
        graph_inputs.append(helper.make_tensor_value_info("position", TensorProto.INT64, []))
    outputs, at = [], {}
    x_BTD, rope_TI = _embed(g, c, params, "input", pos_T)
    for i in range(c.n_layer):

        def write(name, new_BHTK, i=i):
            """Rows pos_T of the buffer along its L axis: a scatter, as the sampler's dynamic_update_slice."""
            if "index_BHTK" not in at:  # every layer's chunk has the same shape
                at["index_BHTK"] = g.op(
                    "Expand",
                    g.op("Reshape", pos_T, g.const(np.array([1, 1, -1, 1], np.int64))),
                    g.op("Shape", new_BHTK),
                )
            past = f"past.{i}.{name}" if step else zeros_BHLK
            if step:
                graph_inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, buffer_shape))
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{name}", TensorProto.FLOAT, buffer_shape)
            )
            return g.op(
                "ScatterElements", past, at["index_BHTK"], new_BHTK, axis=2, out=f"present.{i}.{name}"
            )

        x_BTD = _block(g, c, params[f"block_{i}"], x_BTD, pos_T, pos_S, rope_TI, write)
    g.dense(g.layer_norm(x_BTD, params["ln_f"]), params["lm_head"], out="logits")
    outputs.insert(
        0,
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", 1 if step else "sequence_length", c.vocab_size]
        ),
    )
    return _model(
        g, "orpheus_step" if step else "orpheus_prefill", graph_inputs, outputs, _metadata(c, chars)
    )


def decode_paths(onnx_path: str) -> tuple[str, str]:
    """Where --decode writes the prefill and step graphs: beside the forward file."""
    stem = onnx_path[: -len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
    return stem + ".prefill.onnx", stem + ".step.onnx"


def export_run(run, onnx_path: str, decode: bool = False) -> list[str]:
    """Write a trained run's forward graph to onnx_path (and with decode, the prefill and step graphs
    beside it); returns the paths written. The graphs compute in float32 whatever the run's dtype."""
    c, chars, params = run.model_cfg, run.tokenizer.chars, run.params
    models = [(onnx_path, forward_model(c, params, chars))]
    if decode:
        prefill_path, step_path = decode_paths(onnx_path)
        models += [
            (prefill_path, decode_model(c, params, chars, step=False)),
            (step_path, decode_model(c, params, chars, step=True)),
        ]
    for path, model in models:
        try:
            onnx.save(model, path)
        except OSError as e:
            raise OrpheusError(f"cannot write {path}: {os_reason(e)}") from None
    return [path for path, _ in models]
