"""Kept samplers: a run's compiled sampling programs and its weights in their decoding type, kept in the
user cache so that a later `sample.py` with the same settings starts without importing Flax or Orbax,
tracing or compiling.

    <user cache>/samplers/programs/<key>/settings.json, prefill.pickle, decode.pickle, and for
                                          speculative decoding speculate.pickle
    <user cache>/samplers/params/<key>/<path of each array>.npy

A programs key covers the run's config, the sampler's settings (the draft length and the draft
index's size among them), the code that builds the programs, jax's version and the devices; a params
key covers the checkpoint (its files' sizes and dates) and the weight type. The KEEP most recently
used of each are kept.

The cache is an optimisation: whatever goes wrong with it (a file where a folder should be, a full
disk, a read-only folder, another process writing or evicting the same entry) costs start-up time and
one warning line, never the sample. Loading a program unpickles it, that is, runs code: so the folders
are created private (0o700), and a file or folder that is not the user's, or that others may write,
is never loaded (a warning says which).
"""

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from orpheus_jax import rundir
from orpheus_jax.fileio import atomic_file, os_reason, temporary_name
from orpheus_jax.sampler import Sampler
from orpheus_jax.user_cache import user_cache_dir

KEEP = 8  # samplers kept: the most recently used
BFLOAT16_TAG = "@bfloat16"  # np.save cannot store bfloat16: such an array is kept as its uint16 bits
PATH_SEP = "."  # between the keys of an array's path in its file name

_warned = set()


def warn(message: str) -> None:
    """One line on stderr: the first trouble with the cache in this process (later ones add nothing a
    user can act on)."""
    if not _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Untrusted(Exception):
    """A cache file or folder that is not ours alone."""


def check_trusted(path: str, root: str) -> None:
    """Refuse `path` (and each folder from it up to `root`) unless it is owned by this user and
    writable by nobody else."""
    while True:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            who = "not owned by you" if st.st_uid != os.getuid() else "writable by group or others"
            raise Untrusted(f"{path} is {who}")
        if os.path.abspath(path) == os.path.abspath(root) or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def make_private_dirs(path: str) -> None:
    """The folder and its parents, created 0o700 (an existing one is left as it is, checked on load)."""
    old = os.umask(0o077)
    try:
        os.makedirs(path, exist_ok=True)
    finally:
        os.umask(old)


class ProgramStore:
    """One kept sampler's programs folder: load and save never raise for the cache's own troubles."""

    def __init__(self, directory: str, root: str):
        self.directory, self.root = directory, root
        self._started = {}  # name: the future of a load begun by `start`

    def start(self, *names) -> None:
        """Begin loading these programs, each on a thread of its own: loading is mostly linking machine
        code, outside the GIL, so they load side by side, beside reading the weights and decoding."""
        for name in names:
            if name not in self._started:
                pool = ThreadPoolExecutor(max_workers=1)
                self._started[name] = pool.submit(self._read, name)
                pool.shutdown(wait=False)  # its thread ends with the load

    def ready(self, name: str) -> bool:
        """Whether `load` would return at once: its started load is done, or the program is not kept."""
        future = self._started.get(name)
        return future.done() if future is not None else not self.has(name)

    def load(self, name: str):
        """The kept program (waiting for its started load), or None where none can be loaded."""
        future = self._started.pop(name, None)
        return future.result() if future is not None else self._read(name)

    def _read(self, name: str):
        path = os.path.join(self.directory, f"{name}.pickle")
        try:
            check_trusted(path, self.root)
            with open(path, "rb") as f:
                payload = pickle.load(f)
        except (FileNotFoundError, NotADirectoryError):  # missing: nothing was kept there
            return None
        except Untrusted as e:
            warn(f"not loading the kept sampler program {e}; rebuilding it")
            return None
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            warn(f"cannot read the kept sampler program {path}: {_reason(e)}; rebuilding it")
            return None
        from jax.experimental import serialize_executable

        return serialize_executable.deserialize_and_load(*payload)

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.directory, f"{name}.pickle"))

    def save(self, name: str, compiled) -> None:
        from jax.experimental import serialize_executable

        payload = pickle.dumps(serialize_executable.serialize(compiled))
        _write(os.path.join(self.directory, f"{name}.pickle"), lambda f: f.write(payload))


def _write(path: str, write) -> bool:
    """Write a cache file (its folder created if another process evicted it); False, with a warning, if
    the cache cannot take it."""
    try:
        make_private_dirs(os.path.dirname(path))
        with atomic_file(path, "wb", file_mode=0o600) as f:
            write(f)
        return True
    except OSError as e:
        warn(f"cannot keep the sampler in {os.path.dirname(path)}: {_reason(e)}; sampling goes on without it")
        return False


def _reason(e: Exception) -> str:
    return os_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"


def save_params(directory: str, params) -> bool:
    """Keep the weights as one .npy file per array in `directory` (written whole under a temporary name,
    then renamed: another process sees all of it or none), so that loading maps them instead of reading
    and copying them."""
    tmp = temporary_name(directory)
    try:
        make_private_dirs(tmp)
        for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name, x = PATH_SEP.join(k.key for k in keys), np.asarray(x)
            if x.dtype == jax.numpy.bfloat16:
                name, x = name + BFLOAT16_TAG, x.view(np.uint16)
            fd = os.open(os.path.join(tmp, name + ".npy"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                np.save(f, x)
        _replace_dir(tmp, directory)
        return True
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else: another process kept it meanwhile
            where = os.path.dirname(directory)
            warn(f"cannot keep the sampler in {where}: {_reason(e)}; sampling goes on without it")
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: str, directory: str) -> None:
    """Rename folder `new` to `directory`, moving aside (and removing) what is there: a reader finds the
    old folder, none (a miss) or the new one. Processes that map the old files keep them."""
    try:
        os.rename(new, directory)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        old = temporary_name(directory)
        os.rename(directory, old)
        try:
            os.rename(new, directory)
        finally:
            shutil.rmtree(old, ignore_errors=True)


def load_params(directory: str) -> dict:
    """The weights save_params kept, memory-mapped (read-only; pages come from the OS's file cache)."""
    params = {}
    for file_name in os.listdir(directory):
        path = os.path.join(directory, file_name)
        check_trusted(path, directory)
        value = np.load(path, mmap_mode="r")
        name = file_name.removesuffix(".npy")
        if name.endswith(BFLOAT16_TAG):
            name, value = name.removesuffix(BFLOAT16_TAG), value.view(jax.numpy.bfloat16)
        *parents, leaf = name.split(PATH_SEP)
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return params


def cache_key(*parts) -> str:
    """A name for what depends on `parts` and on the code that builds the programs, jax and the devices."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256()
    for name in ("sampler.py", "model.py", "attention.py", "quantize.py", "drafts.py"):
        with open(os.path.join(here, name), "rb") as f:
            code.update(f.read())
    device = jax.devices()[0]
    material = json.dumps(
        [parts, code.hexdigest(), jax.__version__, jax.lib.__version__, device.platform, device.device_kind]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def kept_sampler(
    workdir: str, step: int, *, batch_size: int, chunk: int = 64, shift: int | None = None,
    weights: str = "float32", dtype: str | None = None, draft_len: int = 0, draft_index=None, mesh=None,
) -> Sampler:  # fmt: skip
    """A sampler for a run's checkpoint: loaded from the user cache when an earlier process kept one,
    else built from the checkpoint, and kept. draft_len, draft_index: as Sampler's (the index is not
    kept here: the run directory holds it)."""
    from orpheus_jax.sampler import index_signature
    from orpheus_jax.sharding import make_mesh

    mesh = mesh or make_mesh()
    root = os.path.join(user_cache_dir(), "samplers")
    with open(rundir.config_path(workdir), "rb") as f:
        run_config = f.read().decode("utf-8", "replace")
    draft_index = draft_index if draft_len else None
    settings = dict(
        batch_size=batch_size, chunk=chunk, shift=shift, weights=weights, dtype=dtype, draft_len=draft_len,
        draft_index=index_signature(draft_index),
    )  # fmt: skip
    programs_dir = os.path.join(root, "programs", cache_key(run_config, settings, mesh.devices.size))
    params_dir = os.path.join(root, "params", cache_key(rundir.fingerprint(workdir, step), weights))
    store = ProgramStore(programs_dir, root)
    sampler = _load(store, params_dir, mesh, draft_index)
    if sampler is not None:
        return sampler
    sampler = _build(workdir, step, store, mesh, settings, draft_index)
    if _write(
        os.path.join(programs_dir, "settings.json"), lambda f: f.write(json.dumps(sampler.settings).encode())
    ):
        save_params(params_dir, sampler.params)
        for kind, ours in (("programs", programs_dir), ("params", params_dir)):
            evict(os.path.join(root, kind), KEEP, ours)
    return sampler


def _build(workdir, step, store, mesh, settings: dict, draft_index) -> Sampler:
    import dataclasses

    from orpheus_jax.checkpoint import load_run

    run = load_run(workdir, step)
    dtype = settings["dtype"]
    model_cfg = dataclasses.replace(run.model_cfg, dtype=dtype) if dtype else run.model_cfg
    return Sampler(
        model_cfg, run.params, batch_size=settings["batch_size"], chunk=settings["chunk"],
        shift=settings["shift"], prng_impl=run.cfg.prng_impl, weights=settings["weights"],
        draft_len=settings["draft_len"], draft_index=draft_index, mesh=mesh, store=store,
    )  # fmt: skip


def _load(store: ProgramStore, params_dir: str, mesh, draft_index) -> Sampler | None:
    """The kept sampler, or None if the cache holds none this process may load."""
    settings_file = os.path.join(store.directory, "settings.json")
    try:
        for path in (settings_file, params_dir):
            check_trusted(path, store.root)
        with open(settings_file) as f:
            settings = json.load(f)
        if not isinstance(settings, dict):
            raise ValueError(f"{settings_file} holds no settings")
        # Complete: every program is kept. The first chunk's load while the weights are read.
        programs = Sampler.programs_for(settings)
        if not all(store.has(name) for name in programs):
            return None
        store.start(*programs[:2])
        params = load_params(params_dir)
    except (FileNotFoundError, NotADirectoryError):  # missing: nothing was kept there
        return None
    except Untrusted as e:
        warn(f"not loading the kept sampler: {e}; rebuilding it")
        return None
    except (OSError, ValueError, EOFError) as e:  # unreadable, or not our format
        warn(f"cannot read the kept sampler ({_reason(e)}); rebuilding it")
        return None
    try:
        sampler = Sampler.from_settings(settings, params, store, mesh, draft_index)
    except (KeyError, TypeError, ValueError) as e:  # settings of another shape: not ours to load
        warn(f"cannot use the kept sampler ({_reason(e)}); rebuilding it")
        return None
    if not sampler.has_programs(*programs[:2]):  # the rest load once the first chunk is out (generate)
        return None
    if not sampler.params_fit("prefill"):  # e.g. read while another process evicted them
        warn(f"the kept weights in {params_dir} do not fit the kept programs; rebuilding them")
        return None
    for path in (store.directory, params_dir):
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
    return sampler


def evict(directory: str, keep: int, ours: str) -> None:
    """Remove all but the `keep` most recently used entries of `directory`, never `ours` (the entry this
    process uses, which another process's eviction may have removed meanwhile: its next write
    recreates it)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.utime(ours)
        entries = sorted(os.scandir(directory), key=_mtime, reverse=True)
        for entry in entries[keep:]:
            if os.path.abspath(entry.path) == os.path.abspath(ours):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            warn(f"cannot evict old samplers from {directory}: {_reason(e)}")


def _mtime(entry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:  # removed by another process meanwhile
        return 0.0
