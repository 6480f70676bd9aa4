"""The corpus: where the text comes from, how it is split, and how batches are drawn from it.

Resolution order: --data FILE; $ORPHEUS_DATA; the cached download; a fresh download of Project
Gutenberg #2199 (Samuel Butler's Iliad), stripped of Gutenberg's header and footer.
Batches are drawn on the device, inside the jitted step, from the whole split held as int32.
"""
import os
import urllib.error
import urllib.request

import jax
import numpy as np
from jax import lax

from orpheus_jax import OrpheusError
from orpheus_jax.cache import user_cache_dir

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
        raise OrpheusError(f"cannot download the Iliad from {url} ({reason}); "
                           "pass --data FILE with a text to train on") from None
    text = strip_gutenberg(raw)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, dest)


def strip_gutenberg(raw: str) -> str:
    """The text between Gutenberg's '*** START OF ...' and '*** END OF ...' lines, with \\n line ends."""
    lines = raw.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise OrpheusError("the downloaded file has no Project Gutenberg START/END markers; "
                           "pass --data FILE with a text to train on")
    return "\n".join(lines[start + 1:end]).strip("\n") + "\n"


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise OrpheusError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise OrpheusError(f"data path is a directory, not a text file: {path}") from None
    except UnicodeDecodeError as e:
        raise OrpheusError(f"data file is not UTF-8 text: {path} ({e.reason} at byte {e.start})") from None
    if not text:
        raise OrpheusError(f"data file is empty: {path}")
    return text


def split(tokens: np.ndarray, val_fraction: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's split: the first (1 - val_fraction) for training, the rest for validation."""
    n = int((1 - val_fraction) * len(tokens))
    train, val = tokens[:n], tokens[n:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) <= block_size:
            raise OrpheusError(f"text too short: its {name} split has {len(part)} characters, "
                               f"it needs more than block_size ({block_size}); "
                               "use a longer text or a smaller --config.block_size")
    return train, val


def sample_batch(data_N: jax.Array, key: jax.Array, batch_size: int, block_size: int):
    """Random windows of block_size + 1 tokens: (inputs_BT, targets_BT), targets shifted by one."""
    start_B = jax.random.randint(key, (batch_size,), 0, data_N.shape[0] - block_size)
    window_BW = jax.vmap(lambda i: lax.dynamic_slice(data_N, (i,), (block_size + 1,)))(start_B)
    return window_BW[:, :-1], window_BW[:, 1:]
