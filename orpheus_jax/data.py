"""The corpus: where the text comes from, how it is split, and how batches are drawn from it.

Resolution order: --data FILE; $ORPHEUS_DATA; the cached download; a fresh download of Project
Gutenberg #2199 (Samuel Butler's Iliad), stripped of Gutenberg's header and footer.

Batches are random windows of block_size + 1 tokens. The windows of step s come from
fold_in(key, s) (step_keys), whatever the topology. A split within the device budget is held whole on
every device, in the token file's integer type, and the windows are cut inside the jitted step
(sample_windows). A larger split stays on the host (HostSplit): the same keys draw the same window
starts there, and each process reads the rows of its own devices from the token file.
"""

import functools
import mmap
import os
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from orpheus_jax import OrpheusError
from orpheus_jax.fileio import atomic_file, os_reason
from orpheus_jax.sharding import batch_sharded, replicated
from orpheus_jax.user_cache import user_cache_dir

GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/2199/pg2199.txt"
CACHED_NAME = "iliad.txt"


def resolve_corpus(data_arg: str | None = None) -> str:
    """Return the path of the training text, downloading the Iliad if nothing else is given."""
    if data_arg:
        return data_arg
    if os.environ.get("ORPHEUS_DATA"):
        return os.environ["ORPHEUS_DATA"]
    cached = os.path.join(user_cache_dir(), CACHED_NAME)
    if not os.path.exists(cached):
        download_iliad(cached)
    return cached


def download_iliad(dest: str) -> None:
    url = os.environ.get("ORPHEUS_DATA_URL", GUTENBERG_URL)
    print(f"Downloading the Iliad (Project Gutenberg #2199) from {url} to {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            raw = response.read().decode("utf-8-sig")
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "reason", e)
        raise OrpheusError(
            f"cannot download the Iliad from {url} ({reason}); pass --data FILE with a text to train on"
        ) from None
    text = strip_gutenberg(raw)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        with atomic_file(dest, "w", file_mode=0o644) as f:
            f.write(text)
    except OSError as e:
        raise OrpheusError(f"cannot keep the downloaded Iliad at {dest}: {os_reason(e)}") from None


def strip_gutenberg(raw: str) -> str:
    """The text between Gutenberg's '*** START OF ...' and '*** END OF ...' lines, with \\n line ends."""
    lines = raw.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise OrpheusError(
            "the downloaded file has no Project Gutenberg START/END markers; "
            "pass --data FILE with a text to train on"
        )
    return "\n".join(lines[start + 1 : end]).strip("\n") + "\n"


def open_text(path: str, binary: bool = False):
    """The training text, opened for reading as UTF-8 (universal newlines), or as bytes."""
    try:
        return open(path, "rb") if binary else open(path, encoding="utf-8")
    except FileNotFoundError:
        raise OrpheusError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise OrpheusError(f"data path is a directory, not a text file: {path}") from None
    except OSError as e:
        raise OrpheusError(f"cannot read data file {path}: {os_reason(e)}") from None


def not_utf8(path: str, reason: str, at_byte: int) -> OrpheusError:
    return OrpheusError(f"data file is not UTF-8 text: {path} ({reason} at byte {at_byte})")


def empty_text(path: str) -> OrpheusError:
    return OrpheusError(f"data file is empty: {path}")


def read_text(path: str) -> str:
    """The whole training text (token_cache reads it in chunks instead, with the same errors)."""
    with open_text(path) as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise not_utf8(path, e.reason, e.start) from None
    if not text:
        raise empty_text(path)
    return text


def split(tokens: np.ndarray, val_fraction: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's split: the first (1 - val_fraction) for training, the rest for validation."""
    n = int((1 - val_fraction) * len(tokens))
    train, val = tokens[:n], tokens[n:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) <= block_size:
            raise OrpheusError(
                f"text too short: its {name} split has {len(part)} characters, "
                f"it needs more than block_size ({block_size}); "
                "use a longer text or a smaller --config.block_size"
            )
        if len(part) > np.iinfo(np.int32).max:  # window starts are drawn as int32
            raise OrpheusError(
                f"text too long: its {name} split has {len(part):,} characters, "
                f"at most {np.iinfo(np.int32).max:,} are supported"
            )
    return train, val


def step_keys(key: jax.Array, step, grad_accum_steps: int):
    """(batch keys, dropout keys) of the micro-batches of optimizer step `step`, shaped
    (grad_accum_steps,)."""
    key = jax.random.fold_in(key, step)
    micro_G = jax.random.split(key, grad_accum_steps) if grad_accum_steps > 1 else key[None]
    keys_G2 = lax.map(jax.random.split, micro_G)
    return keys_G2[:, 0], keys_G2[:, 1]


def window_starts(key: jax.Array, n_tokens: int, batch_size: int, block_size: int) -> jax.Array:
    return jax.random.randint(key, (batch_size,), 0, n_tokens - block_size)


def sample_windows(tokens_Z: jax.Array, key: jax.Array, batch_size: int, block_size: int) -> jax.Array:
    """window_BW: batch_size random windows of block_size + 1 tokens."""
    start_B = window_starts(key, tokens_Z.shape[0], batch_size, block_size)
    return jax.vmap(lambda i: lax.dynamic_slice(tokens_Z, (i,), (block_size + 1,)))(start_B)


def inputs_targets(window_BW: jax.Array):
    """(inputs_BT, targets_BT) as int32, targets shifted by one."""
    window_BW = window_BW.astype(jnp.int32)
    return window_BW[:, :-1], window_BW[:, 1:]


def sample_batch(tokens_Z: jax.Array, key: jax.Array, batch_size: int, block_size: int):
    """Random windows of block_size + 1 tokens: (inputs_BT, targets_BT), targets shifted by one."""
    return inputs_targets(sample_windows(tokens_Z, key, batch_size, block_size))


def to_device(tokens_Z: np.ndarray, mesh) -> jax.Array:
    """The whole split on every device. Each process copies it from its own memory (map): nothing
    goes through the other processes, as jax.device_put's equality check across processes would."""
    return jax.make_array_from_callback(tokens_Z.shape, replicated(mesh), lambda index: tokens_Z[index])


def place(tokens_Z: np.ndarray, mesh, budget_bytes: int, batch_size: int, block_size: int):
    """The split as the steps read it: a device array within the budget, else a HostSplit."""
    if tokens_Z.nbytes <= budget_bytes:
        return to_device(tokens_Z, mesh)
    return HostSplit(tokens_Z, mesh, batch_size, block_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _steps_window_starts(key, first_step, n_steps, grad_accum_steps, n_tokens, batch_size, block_size):
    """(n_steps, G, B) window starts of steps first_step.., as the jitted train step draws them."""

    def one_step(step):
        batch_keys_G, _ = step_keys(key, step, grad_accum_steps)
        return lax.map(lambda k: window_starts(k, n_tokens, batch_size, block_size), batch_keys_G)

    return lax.map(one_step, first_step + jnp.arange(n_steps))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _keys_window_starts(keys_C, n_tokens, batch_size, block_size):
    return lax.map(lambda k: window_starts(k, n_tokens, batch_size, block_size), keys_C)


class HostSplit:
    """A split beyond the device budget: its windows are cut on the host from the token file.

    The window starts are drawn with the same keys and jax.random calls as on the device, on this
    host's CPU; each process then reads only the rows of its own devices and they are assembled into one
    global array, split over the batch axis like the device path's batches.

    The windows are read with pread, not through the memory map: random reads through a map fault whole
    (large) page-cache folios into the process, about 1.7 MB of RSS per window on the kernel measured, so
    the RSS of a long run would grow to the size of the file."""

    DRAW_STEPS = 1024  # train steps drawn at once: on a CPU-only host, a draw waits for the device

    def __init__(self, tokens_Z: np.memmap, mesh, batch_size: int, block_size: int):
        self.shape, self.dtype = tokens_Z.shape, tokens_Z.dtype
        path, self._offset = _file_offset(tokens_Z)
        self._file = open(path, "rb")
        self._mesh, self._batch_size, self._block_size = mesh, batch_size, block_size
        self._cpu = jax.local_devices(backend="cpu")[0]
        self._drawn = (0, np.zeros((0, 0, batch_size), np.int32))  # (first step, starts_MGB)

    def train_windows(
        self, key: jax.Array, first_step: int, n_steps: int, grad_accum_steps: int
    ) -> jax.Array:
        """windows_MGBW of steps first_step .. first_step + n_steps - 1 (key: the run's train key)."""
        first, starts = self._drawn
        if not first <= first_step <= first_step + n_steps <= first + len(starts):
            starts = np.asarray(
                _steps_window_starts(
                    jax.device_put(key, self._cpu),
                    first_step,
                    max(n_steps, self.DRAW_STEPS),
                    grad_accum_steps,
                    self.shape[0],
                    self._batch_size,
                    self._block_size,
                )
            )
            first, self._drawn = first_step, (first_step, starts)
        return self._cut(starts[first_step - first : first_step - first + n_steps])

    def eval_windows(self, keys_C: jax.Array) -> jax.Array:
        """windows_CBW of one batch per key, as sample_windows draws them."""
        starts = _keys_window_starts(
            jax.device_put(keys_C, self._cpu), self.shape[0], self._batch_size, self._block_size
        )
        return self._cut(np.asarray(starts))

    def _cut(self, starts_xB: np.ndarray) -> jax.Array:
        width = self._block_size + 1
        sharding = batch_sharded(self._mesh, batch_axis=starts_xB.ndim - 1)
        return jax.make_array_from_callback(
            starts_xB.shape + (width,), sharding, lambda index: self._read(starts_xB[index[:-1]], width)
        )

    def _read(self, starts: np.ndarray, width: int) -> np.ndarray:
        windows = np.empty(starts.shape + (width,), self.dtype)
        size, fd = width * self.dtype.itemsize, self._file.fileno()
        for i, start in np.ndenumerate(starts):
            offset = self._offset + int(start) * self.dtype.itemsize
            windows[i] = np.frombuffer(os.pread(fd, size, offset), self.dtype)
        return windows


def _file_offset(tokens_Z: np.memmap) -> tuple[str, int]:
    """(file, byte offset) of a memory-mapped array or a slice of one (np.memmap keeps the map's own
    offset, not the slice's): its address minus that of the map, mapped from the file's start."""
    base = tokens_Z
    while not isinstance(base, mmap.mmap):
        base = base.base
    map_start = tokens_Z.offset - tokens_Z.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap maps from
    return tokens_Z.filename, map_start + tokens_Z.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
