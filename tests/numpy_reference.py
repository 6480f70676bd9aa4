"""An independent NumPy reading of the seed's architecture and its options, the reference the model's
tests compare to."""

import math

import jax
import numpy as np

ERF = np.vectorize(math.erf)


def activation(name, x):
    """The MLP's nonlinearity: ReLU, ReLU squared, or GELU in its exact form x * Phi(x)."""
    relu = np.maximum(x, 0)
    return {"relu": relu, "relu2": relu * relu, "gelu": 0.5 * x * (1 + ERF(x / math.sqrt(2)))}[name]


def rms_normalized(x):
    """x divided by its root mean square over the last axis (QK-norm: no gain, epsilon 1e-6)."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def rotated(x_TK, positions):
    """Rotary embedding, halves convention: the pair (x[i], x[i + K/2]) read as the complex number
    x[i] + 1j * x[i + K/2] and multiplied by exp(1j * p * 10000^(-2i/K)) at position p."""
    half = x_TK.shape[-1] // 2
    z = x_TK[..., :half] + 1j * x_TK[..., half:]
    theta = np.array([[p * 10000.0 ** (-2 * i / x_TK.shape[-1]) for i in range(half)] for p in positions])
    z = z * np.exp(1j * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def sinusoidal_table(positions, dim):
    pe = np.zeros((len(positions), dim))
    for row, pos in enumerate(positions):
        for i in range(0, dim, 2):
            pe[row, i] = math.sin(pos / 10000 ** (i / dim))
            pe[row, i + 1] = math.cos(pos / 10000 ** (i / dim))
    return pe


def numpy_forward(c, p, tokens_BT, matmul_input=lambda x: x, start=0):
    """Logits of a model.GPTConfig `c` with params `p`, in float64: pre-LN, causal MHA, MLP x4, for
    tokens at positions start .. start + T - 1 (attending to each other only).

    matmul_input(x) is what a weight matrix multiplies instead of the activations x (rows on the last
    axis): e.g. x rounded to bfloat16, or quantized to int8 per row."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens_BT.shape
    positions = list(range(start, start + T))

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    x = p["wte"]["embedding"][tokens_BT]
    if c.pos_encoding == "learned":
        x = x + p["wpe"]["embedding"][start : start + T]
    elif c.pos_encoding == "sinusoidal":
        x = x + sinusoidal_table(positions, c.n_embd)
    scale = 1 / math.sqrt(c.head_size if c.attn_scale == "head" else c.n_embd)
    for i in range(c.n_layer):
        b = p[f"block_{i}"]
        h = matmul_input(ln(x, b["ln1"]))
        heads = []
        for hd in range(c.n_head):
            q = h @ b["attn"]["query"]["kernel"][:, hd]
            k = h @ b["attn"]["key"]["kernel"][:, hd]
            v = h @ b["attn"]["value"]["kernel"][:, hd]
            if c.qk_norm:
                q, k = rms_normalized(q), rms_normalized(k)
            if c.pos_encoding == "rope":
                q, k = rotated(q, positions), rotated(k, positions)
            w = q @ k.transpose(0, 2, 1) * scale
            w = np.where(np.tril(np.ones((T, T))) == 1, w, -np.inf)
            w = np.exp(w - w.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v)
        proj = b["attn"]["proj"]
        x = (
            x
            + matmul_input(np.concatenate(heads, -1)) @ proj["kernel"].reshape(c.n_embd, c.n_embd)
            + proj["bias"]
        )
        h = matmul_input(ln(x, b["ln2"]))
        m = b["mlp"]
        hidden = matmul_input(activation(c.mlp_activation, h @ m["fc"]["kernel"] + m["fc"]["bias"]))
        x = x + hidden @ m["out"]["kernel"] + m["out"]["bias"]
    return matmul_input(ln(x, p["ln_f"])) @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]
