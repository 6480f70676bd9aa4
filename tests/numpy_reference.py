"""An independent NumPy reading of the seed's architecture, the reference the model's tests compare to."""

import math

import jax
import numpy as np


def numpy_forward(c, p, tokens_BT, matmul_input=lambda x: x):
    """Logits of a model.GPTConfig `c` with params `p`, in float64: pre-LN, causal MHA, ReLU MLP x4.

    matmul_input(x) is what a weight matrix multiplies instead of the activations x (rows on the last
    axis): e.g. x rounded to bfloat16, or quantized to int8 per row."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tokens_BT.shape

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    x = p["wte"]["embedding"][tokens_BT]
    if c.pos_encoding == "learned":
        x = x + p["wpe"]["embedding"][:T]
    else:
        pe = np.zeros((T, c.n_embd))
        for pos in range(T):
            for i in range(0, c.n_embd, 2):
                pe[pos, i] = math.sin(pos / 10000 ** (i / c.n_embd))
                pe[pos, i + 1] = math.cos(pos / 10000 ** (i / c.n_embd))
        x = x + pe
    scale = 1 / math.sqrt(c.head_size if c.attn_scale == "head" else c.n_embd)
    for i in range(c.n_layer):
        b = p[f"block_{i}"]
        h = matmul_input(ln(x, b["ln1"]))
        heads = []
        for hd in range(c.n_head):
            q = h @ b["attn"]["query"]["kernel"][:, hd]
            k = h @ b["attn"]["key"]["kernel"][:, hd]
            v = h @ b["attn"]["value"]["kernel"][:, hd]
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
        relu = matmul_input(np.maximum(h @ m["fc"]["kernel"] + m["fc"]["bias"], 0))
        x = x + relu @ m["out"]["kernel"] + m["out"]["bias"]
    return matmul_input(ln(x, p["ln_f"])) @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]
