"""The seed recipe (Orpheus-GPT): 6 layers x 6 heads x 384, block 256, batch 64, dropout 0.2.

Every key a run reads is here; other configs start from this one and change a few. Figures behind the
defaults are in benchmarks/RESULTS.md; docs/training.md explains every key.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Model (the seed's architecture; the options after it are off in the seed recipe).
    c.n_layer = 6
    c.n_head = 6
    c.n_embd = 384
    c.block_size = 256  # context length in characters
    c.dropout = 0.2
    c.pos_encoding = "learned"  # or "sinusoidal", or "rope" (rotary, no position table)
    c.attn_scale = "head"  # scores * head_size**-0.5; "embd" = * n_embd**-0.5, as the seed's code does
    c.mlp_activation = "relu"  # or "relu2" (ReLU squared), "gelu"
    c.qk_norm = False  # RMS-normalize queries and keys per head before the scores
    c.zero_init_proj = False  # start the attention and MLP output projections at zero
    c.dtype = "float32"  # compute dtype; "bfloat16" for TPU/GPU (parameters stay float32)
    c.attention = "auto"  # "xla" (our einsums), "fused" (jax.nn.dot_product_attention), "pallas"; see docs
    c.token_embedding = "onehot"  # a one-hot product (its gradient has no scatter-add); or "gather"

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
    c.lr_decay_iters = 0  # cosine reaches min_lr here; 0 = at max_iters (a resumed run keeps its own)
    c.weight_decay = 0.1  # on Dense kernels only: not biases, LayerNorm or embeddings
    c.beta1 = 0.9
    c.beta2 = 0.99
    c.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    c.ema_decay = 0.0  # > 0: evaluate, keep as best, sample and export an exponential average of the weights

    # Evaluation, logging, checkpoints.
    c.eval_interval = 500  # estimate train/val loss every this many steps
    c.eval_iters = 200  # batches per estimate
    c.log_interval = 10  # steps between progress-bar updates (each one syncs with the device)
    c.checkpoint_interval = 500
    c.keep_checkpoints = 3  # the last K, and the one with the lowest validation loss
    c.early_stop_patience = 0  # stop after this many evaluations without a new best; 0: never

    # Data and randomness.
    c.val_fraction = 0.1  # the last 10% of the text is validation, as in the seed
    c.seed = 1337
    c.prng_impl = "threefry2x32"  # or "rbg" / "unsafe_rbg": JAX's other PRNGs
    c.dropout_rng = "hash"  # masks from a counter hash of the step's key; "jax": JAX's PRNG bits (dearer)
    c.steps_per_call = 5  # optimizer steps per jitted call (lax.scan): fewer dispatches, the same steps
    c.param_sharding = "replicated"  # or "fsdp": parameters and optimizer state sharded over the devices
    c.device_data_budget = 512 * 2**20  # bytes of a split held on every device; more: batched on the host
    c.cpu_dots = "onednn"  # CPU train/eval matmuls in oneDNN (not kept in the compile cache); or "xla"
    return c
