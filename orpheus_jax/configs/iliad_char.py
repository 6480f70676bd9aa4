"""The seed recipe (Orpheus-GPT): 6 layers x 6 heads x 384, block 256, batch 64, dropout 0.2.

Every key a run reads is here; other configs start from this one and change a few.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Model (the seed's architecture).
    c.n_layer = 6
    c.n_head = 6
    c.n_embd = 384
    c.block_size = 256  # context length in characters
    c.dropout = 0.2
    c.pos_encoding = "learned"  # or "sinusoidal"
    c.attn_scale = "head"  # scores * head_size**-0.5; "embd" = * n_embd**-0.5, as the seed's code does
    c.dtype = "float32"  # compute dtype; "bfloat16" for TPU/GPU (parameters stay float32)

    # Optimization: AdamW, linear warmup then cosine decay to min_lr at max_iters.
    c.optimizer = "adamw"  # or "muon": Muon for the blocks' matrices, AdamW (learning_rate) for the rest
    c.muon_learning_rate = 0.02  # Muon's peak rate (same warmup and cosine; its floor scaled like min_lr)
    c.muon_weight_decay = 0.0  # Muon's decoupled weight decay, multiplied by its learning rate
    c.batch_size = 64  # sequences per micro-batch, split across devices
    c.grad_accum_steps = 1  # micro-batches per optimizer step
    c.max_iters = 5000
    c.learning_rate = 3e-4
    c.min_lr = 3e-5
    c.warmup_iters = 100
    c.lr_decay_iters = (
        0  # cosine reaches min_lr here; 0 = at max_iters (fix it to resume with more iters unchanged)
    )
    c.weight_decay = 0.1  # on Dense kernels only: not biases, LayerNorm or embeddings
    c.beta1 = 0.9
    c.beta2 = 0.99
    c.grad_clip = 1.0  # global-norm clipping; 0 turns it off

    # Evaluation, logging, checkpoints.
    c.eval_interval = 500  # estimate train/val loss every this many steps
    c.eval_iters = 200  # batches per estimate
    c.log_interval = 10  # steps between progress-bar updates (each one syncs with the device)
    c.checkpoint_interval = 500
    c.keep_checkpoints = 3

    # Data and randomness.
    c.val_fraction = 0.1  # the last 10% of the text is validation, as in the seed
    c.seed = 1337
    c.prng_impl = "threefry2x32"  # or "rbg" / "unsafe_rbg": JAX's other PRNGs (no faster on CPU)
    # Dropout masks from a counter hash of the PRNG key ("jax": JAX's PRNG bits, 30x dearer on CPU).
    c.dropout_rng = "hash"
    # Optimizer steps per jitted call (lax.scan): the same steps, fewer dispatches (+40-50% tokens/s for the
    # small shape on 2 CPU cores, +1% for the seed's on an H100); intervals need not be multiples of it.
    c.steps_per_call = 5
    c.param_sharding = "replicated"  # or "fsdp": parameters and optimizer state sharded over the devices
    c.device_data_budget = (
        512 * 2**20
    )  # bytes of a split held on every device; a larger split is batched on the host
    # CPU train/eval matmuls in oneDNN (up to 23% faster steps; not kept in the compile cache); or "xla".
    c.cpu_dots = "onednn"
    return c
