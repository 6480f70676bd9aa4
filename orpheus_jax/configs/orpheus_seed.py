"""The seed's exact recipe (Orpheus-GPT's training script), where iliad_char.py has nanoGPT's optimizer.

Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant 1e-3 (the
seed's `learning_rate = 3e-4` variable is never used), no warmup, no clipping, scores scaled by
n_embd**-0.5, seed 1234. Architecture, batch, iterations and evaluation are iliad_char.py's.
"""

from orpheus_jax.configs import iliad_char


def get_config():
    c = iliad_char.get_config()
    c.attn_scale = "embd"  # the seed's code scales by C**-0.5 with C = n_embd, not head_size
    c.learning_rate = 1e-3
    c.min_lr = 1e-3  # constant: the cosine runs from 1e-3 to 1e-3
    c.warmup_iters = 0
    c.weight_decay = 0.0  # AdamW without decay is Adam
    c.beta2 = 0.999
    c.grad_clip = 0.0
    c.seed = 1234  # torch.manual_seed(1234) in the seed; JAX's streams differ from torch's anyway
    return c
