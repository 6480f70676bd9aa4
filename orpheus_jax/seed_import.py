"""The seed's model.pth -> a run directory, without PyTorch and without executing the pickle.

torch.save writes a zip: <name>/data.pkl (the pickled object) and <name>/data/<key> (one raw storage
per key), plus <name>/byteorder. The seed's file pickles the whole nn.Module (classes in __main__);
a state_dict file pickles an OrderedDict of tensors. We unpickle data.pkl with `SafeUnpickler`:
its find_class hands out only the tensor-rebuilding functions (reimplemented here on NumPy), plain
containers, and inert stubs for the module classes; any other global is refused before anything
runs. Then the seed's names and shapes are checked and mapped onto the GPT's parameters.

Seed parameter (torch Linear weights are (out, in))   GPT parameter
  token_embedding_table.weight (V, D)                  wte/embedding
  position_embedding_table.weight (L, D)               wpe/embedding
  blocks.i.sa.heads.h.{query,key,value}.weight (K, D)  block_i/attn/{query,key,value}/kernel[:, h, :]
  blocks.i.sa.projection.{weight (D, H*K), bias}       block_i/attn/proj/{kernel (H, K, D), bias}
  blocks.i.ffwd.net.0 / net.2 {weight, bias}           block_i/mlp/fc / out {kernel, bias}
  blocks.i.lnm1 / lnm2 / lmnf {weight, bias}           block_i/ln1 / ln2, ln_f {scale, bias}
  lm_head.{weight, bias}                               lm_head/{kernel, bias}
  blocks.i.sa.heads.h.tril (L, L)                      (the causal mask: checked, not stored)
"""

import collections
import io
import math
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from orpheus_jax import OrpheusError, checkpoint, data, rundir
from orpheus_jax import config as config_lib
from orpheus_jax.model import GPTConfig, init_params
from orpheus_jax.optim import make_optimizer
from orpheus_jax.tokenizer import CharTokenizer

# The seed's own classes, pickled by reference to __main__ (the script that trained it).
SEED_CLASSES = {"BigramLanguageModel", "Block", "MultiHeadAttention", "Head", "FeedForward"}
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _ModuleStub:
    """Stands in for an nn.Module class: NEWOBJ makes one without running anything, BUILD hands it
    the module's __dict__ (its _parameters, _buffers and _modules), which we only read."""

    def __setstate__(self, state):
        self.__dict__["state"] = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """torch._utils._rebuild_tensor_v2 on a NumPy storage: a strided view, copied."""
    if not (
        isinstance(storage, np.ndarray)
        and isinstance(storage_offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(n, int) and n >= 0 for n in size + stride)
        and storage_offset >= 0
    ):
        raise ValueError("a tensor record is malformed")
    last = (
        storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    )
    if (
        last >= storage.size or math.prod(size) > storage.size
    ):  # the second: no broadcast views, no huge copies
        raise ValueError(f"a tensor of shape {size} does not fit its storage ({storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], size, [s * storage.itemsize for s in stride]
    )
    return view.copy()


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    return data


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save data.pkl without importing or calling anything it names, except the
    tensor rebuilders above and plain containers; storages come from `read_storage(key, dtype)`."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,  # a module's _non_persistent_buffers_set
        ("__builtin__", "set"): set,  # the same, as pickle protocol 2 spells it
    }

    def __init__(self, file, read_storage):
        super().__init__(file)
        self._read_storage = read_storage
        self._storages = {}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith("torch.nn.modules.") or (module == "__main__" and name in SEED_CLASSES):
            return type(name, (_ModuleStub,), {})
        raise OrpheusError(
            f"it names {module}.{name}, which is neither a tensor nor a class of the seed's "
            "model; refusing to load it (nothing was executed)"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise OrpheusError(f"it holds an unknown persistent record {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            storage = self._read_storage(key, storage_type.dtype)
            if storage.size < numel:
                raise OrpheusError(
                    f"storage {key} holds {storage.size} elements, the file says {numel} (truncated?)"
                )
            self._storages[key] = storage[:numel]
        return self._storages[key]


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """The state dict (name -> array) of a torch.save file of a whole module or of a state_dict."""
    if not os.path.isfile(path):
        raise OrpheusError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise OrpheusError(
            f"{path} is not a torch.save zip archive (truncated, not a PyTorch file, "
            "or saved by PyTorch < 1.6)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise OrpheusError("it has no <name>/data.pkl record: not a torch.save file")
            prefix = pkl[0][: -len("data.pkl")]
            names = set(archive.namelist())
            order = "<"
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() == b"big":
                order = ">"

            def read_storage(key, dtype):
                record = f"{prefix}data/{key}"
                if not re.fullmatch(r"\w+", key) or record not in names:
                    raise OrpheusError(f"its storage {key!r} is missing")
                raw = archive.read(record)
                dtype = dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype
                return np.frombuffer(raw[: len(raw) // dtype.itemsize * dtype.itemsize], dtype).astype(
                    dtype.newbyteorder("=")
                )

            obj = SafeUnpickler(io.BytesIO(archive.read(pkl[0])), read_storage).load()
        if isinstance(obj, _ModuleStub):
            return _module_state_dict(obj)
        if isinstance(obj, dict) and all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
        ):
            return dict(obj)
        raise OrpheusError(f"it holds a {type(obj).__name__}, neither a pickled model nor a state_dict")
    except OrpheusError as e:
        raise OrpheusError(f"cannot load {path}: {e}") from None
    except (
        zipfile.BadZipFile,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        RecursionError,
        OSError,
    ) as e:
        raise OrpheusError(
            f"cannot load {path} (truncated or corrupt?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _module_state_dict(root: _ModuleStub) -> dict[str, np.ndarray]:
    """What nn.Module.state_dict() returns: parameters and persistent buffers, by dotted name."""
    out, seen, todo = {}, set(), [("", root)]
    while todo:
        prefix, module = todo.pop()
        if id(module) in seen or not isinstance(module, _ModuleStub):
            raise OrpheusError("its module tree is malformed")
        seen.add(id(module))
        state = getattr(module, "state", None)
        if not isinstance(state, dict):
            raise OrpheusError("its module tree is malformed")
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in (state.get(group) or {}).items():
                if value is not None and name not in skip:
                    if not isinstance(value, np.ndarray):
                        raise OrpheusError(f"{prefix}{name} is not a tensor")
                    out[prefix + name] = value
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                todo.append((f"{prefix}{name}.", child))
    return out


def infer_shape(state: dict[str, np.ndarray]) -> dict:
    """n_layer, n_head, n_embd, block_size and vocab_size from the seed's names and shapes."""

    def need(name):
        if name not in state:
            raise OrpheusError(f"not the seed's architecture: it has no {name}")
        return state[name]

    vocab_size, n_embd = need("token_embedding_table.weight").shape
    block_size = need("position_embedding_table.weight").shape[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.", k))}
    if not layers or not heads:
        raise OrpheusError("not the seed's architecture: no blocks.N.sa.heads.M parameters")
    return dict(
        vocab_size=vocab_size,
        n_embd=n_embd,
        block_size=block_size,
        n_layer=max(layers) + 1,
        n_head=max(heads) + 1,
    )


def expected_shapes(vocab_size, n_embd, block_size, n_layer, n_head) -> dict[str, tuple]:
    D, K, V, L = n_embd, n_embd // n_head, vocab_size, block_size
    shapes = {
        "token_embedding_table.weight": (V, D),
        "position_embedding_table.weight": (L, D),
        "lmnf.weight": (D,),
        "lmnf.bias": (D,),
        "lm_head.weight": (V, D),
        "lm_head.bias": (V,),
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        for h in range(n_head):
            shapes.update({f"{b}sa.heads.{h}.{n}.weight": (K, D) for n in ("key", "query", "value")})
            shapes[f"{b}sa.heads.{h}.tril"] = (L, L)
        shapes.update(
            {
                f"{b}sa.projection.weight": (D, D),
                f"{b}sa.projection.bias": (D,),
                f"{b}ffwd.net.0.weight": (4 * D, D),
                f"{b}ffwd.net.0.bias": (4 * D,),
                f"{b}ffwd.net.2.weight": (D, 4 * D),
                f"{b}ffwd.net.2.bias": (D,),
            }
        )
        for ln in ("lnm1", "lnm2"):
            shapes.update({f"{b}{ln}.weight": (D,), f"{b}{ln}.bias": (D,)})
    return shapes


def seed_to_params(state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(shape, params): the inferred sizes and the GPT's parameter tree (float32 NumPy)."""
    shape = infer_shape(state)
    if shape["n_embd"] % shape["n_head"]:
        raise OrpheusError(
            f"not the seed's architecture: n_embd {shape['n_embd']} is not a multiple of "
            f"{shape['n_head']} heads"
        )
    expected = expected_shapes(**shape)
    missing = [f"missing {k}" for k in expected if k not in state]
    unexpected = [f"unexpected {k}" for k in state if k not in expected]
    misshapen = [
        f"{k} has shape {tuple(state[k].shape)}, expected {v}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != v
    ]
    if missing or unexpected or misshapen:
        shown = missing[:2] + unexpected[:2] + misshapen[:2]
        more = len(missing) + len(unexpected) + len(misshapen) - len(shown)
        raise OrpheusError(
            f"not the seed's architecture ({shape['n_layer']} layers, {shape['n_head']} heads, "
            f"{shape['n_embd']} dims inferred): {'; '.join(shown)}" + (f" (and {more} more)" if more else "")
        )
    causal = np.tril(np.ones((shape["block_size"],) * 2))
    if any(not np.array_equal(v, causal) for k, v in state.items() if k.endswith(".tril")):
        raise OrpheusError("not the seed's architecture: a tril buffer is not the causal mask")

    w = {k: np.asarray(v, np.float32) for k, v in state.items()}
    H, K, D = shape["n_head"], shape["n_embd"] // shape["n_head"], shape["n_embd"]
    linear = lambda name: {"kernel": w[name + ".weight"].T, "bias": w[name + ".bias"]}
    norm = lambda name: {"scale": w[name + ".weight"], "bias": w[name + ".bias"]}
    params = {
        "wte": {"embedding": w["token_embedding_table.weight"]},
        "wpe": {"embedding": w["position_embedding_table.weight"]},
        "ln_f": norm("lmnf"),
        "lm_head": linear("lm_head"),
    }
    for i in range(shape["n_layer"]):
        b = f"blocks.{i}."
        heads = lambda n, b=b: np.stack(
            [w[f"{b}sa.heads.{h}.{n}.weight"].T for h in range(H)], axis=1
        )  # (D, H, K)
        proj = linear(b + "sa.projection")
        params[f"block_{i}"] = {
            "ln1": norm(b + "lnm1"),
            "ln2": norm(b + "lnm2"),
            "attn": {
                "query": {"kernel": heads("query")},
                "key": {"kernel": heads("key")},
                "value": {"kernel": heads("value")},
                "proj": {"kernel": proj["kernel"].reshape(H, K, D), "bias": proj["bias"]},
            },
            "mlp": {"fc": linear(b + "ffwd.net.0"), "out": linear(b + "ffwd.net.2")},
        }
    return shape, params


def seed_run_config(base_cfg, shape: dict):
    """The run config of an imported model: base_cfg (the seed recipe) with the file's sizes."""
    cfg = base_cfg.copy_and_resolve_references()
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        cfg[key] = int(shape[key])
    # The seed's architecture, whatever the base config turns on.
    cfg.pos_encoding, cfg.attn_scale, cfg.mlp_activation, cfg.qk_norm = "learned", "embd", "relu", False
    config_lib.validate(cfg)
    return cfg


def import_seed(pth_path: str, workdir: str, text_path: str | None, base_cfg) -> tuple[object, CharTokenizer]:
    """Write a run directory for the seed's file: config.json, tokenizer.json, and a checkpoint at
    step 0 holding a full train state (the seed's weights, a fresh optimizer state), so sample.py,
    app.py and export.py read it like any run and train.py can fine-tune it.

    text_path: the training text, for the vocabulary (None: the Iliad, as train.py finds it; looked
    for only once the file has passed its checks)."""
    from orpheus_jax.train import init_state  # the train state's layout is train.py's

    shape, params = seed_to_params(read_torch_file(pth_path))
    text_path = data.resolve_corpus(text_path)
    tokenizer = CharTokenizer.from_text(data.read_text(text_path))
    if tokenizer.vocab_size != shape["vocab_size"]:
        raise OrpheusError(
            f"{text_path} has {tokenizer.vocab_size} distinct characters but the model's "
            f"vocabulary has {shape['vocab_size']}: pass --text with the text it was trained on"
        )
    cfg = seed_run_config(base_cfg, shape)
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    target = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    assert jax.tree.structure(target) == jax.tree.structure(params), (
        "seed_to_params out of step with model.py"
    )
    lock = rundir.WorkdirLock(workdir)
    try:
        ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
        if ckpt.all_steps() or os.path.exists(rundir.config_path(workdir)):
            raise OrpheusError(f"{workdir} already holds a run; import into a new --workdir")
        params = jax.tree.map(jnp.asarray, params)
        state = init_state(cfg, model_cfg, make_optimizer(cfg))
        state = state.replace(params=params, ema=None if state.ema is None else params)
        config_lib.save(cfg, tokenizer.vocab_size, rundir.config_path(workdir))
        tokenizer.save(rundir.tokenizer_path(workdir))
        ckpt.save(0, state)
        ckpt.wait()
        ckpt.close()
    finally:
        lock.release()
    return cfg, tokenizer
