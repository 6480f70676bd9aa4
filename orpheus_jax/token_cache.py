"""A text as a file of token ids: tokenized once into the user cache, memory-mapped afterwards.

    <cache>/tokens/<text sha256>.chars.json            the text's characters (its own vocabulary) and length
    <cache>/tokens/<text sha256>-<vocab sha256>.<dtype>  its token ids, in the smallest unsigned integer
                                                       type that holds the vocabulary (uint8 up to 256)

The text is only ever read in chunks: the first run of a text reads it three times (hash; characters;
ids), later runs once (hash). The ids are exactly CharTokenizer.encode of the whole text as
data.read_text reads it (UTF-8, universal newlines).
"""

import codecs
import contextlib
import hashlib
import json
import os
import time

import numpy as np

from orpheus_jax import OrpheusError
from orpheus_jax.data import empty_text, not_utf8, open_text
from orpheus_jax.fileio import atomic_file, os_reason
from orpheus_jax.tokenizer import CharTokenizer
from orpheus_jax.user_cache import user_cache_dir

CHUNK_CHARS = 1 << 22  # 4M characters: ~20 MB of temporaries at worst (a chunk beyond ASCII)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1))


def load(path: str, tokenizer: CharTokenizer | None = None) -> tuple[CharTokenizer, np.ndarray]:
    """(tokenizer, token ids of the text at `path` as a read-only memory map).

    tokenizer: the vocabulary to encode with (a resumed run's); None: the text's own characters."""
    t0 = time.perf_counter()
    digest = _sha256(path)
    directory = os.path.join(user_cache_dir(), "tokens")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OrpheusError(f"cannot create the token cache {directory}: {os_reason(e)}") from None
    chars_path = os.path.join(directory, f"{digest}.chars.json")
    try:
        with open(chars_path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = _scan(path)
        with _new_file(chars_path) as f:
            f.write(json.dumps(info).encode("utf-8"))
    tokenizer = tokenizer or CharTokenizer(info["chars"])
    tokenizer.encode(info["chars"])  # characters outside the vocabulary: the one-line error naming them
    dtype = token_dtype(tokenizer.vocab_size)
    vocab_digest = hashlib.sha256(tokenizer.chars.encode("utf-8")).hexdigest()[:16]
    tokens_path = os.path.join(directory, f"{digest}-{vocab_digest}.{dtype.name}")
    if not os.path.exists(tokens_path) or os.path.getsize(tokens_path) != info["length"] * dtype.itemsize:
        print(f"Tokenizing {path} ({os.path.getsize(path) / 1e6:,.1f} MB) into {tokens_path}", flush=True)
        _encode(path, tokenizer, dtype, tokens_path)
        seconds = time.perf_counter() - t0  # all of it: hashing, finding the characters, encoding
        print(f"Tokenized in {seconds:.1f} s ({os.path.getsize(path) / 1e6 / seconds:,.0f} MB/s)", flush=True)
    return tokenizer, np.memmap(tokens_path, dtype=dtype, mode="r")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open_text(path, binary=True) as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(path: str):
    """The text in chunks of characters, decoded as data.read_text decodes it."""
    with open_text(path) as f:
        try:
            while chunk := f.read(CHUNK_CHARS):
                yield chunk
        except UnicodeDecodeError as e:
            raise not_utf8(path, e.reason, _bad_byte(path)) from None


def _bad_byte(path: str) -> int:
    """The offset of the first byte that is not UTF-8 (the decoder's own offset is within its chunk)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the previous chunk's unfinished character
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            if not chunk:
                return offset
            offset += len(chunk)


def _scan(path: str) -> dict:
    """{"chars": the sorted characters of the text, "length": its length in characters}."""
    seen, length = set(), 0
    for chunk in _chunks(path):
        length += len(chunk)
        if chunk.isascii():  # delete the characters already seen, at C speed; look at what is left
            known = "".join(c for c in seen if c.isascii()).encode("ascii")
            seen.update(chunk.encode("ascii").translate(None, known).decode("ascii"))
        else:
            seen.update(chunk)
    if not length:
        raise empty_text(path)
    return {"chars": "".join(sorted(seen)), "length": length}


def _encode(path: str, tokenizer: CharTokenizer, dtype: np.dtype, tokens_path: str) -> None:
    # With one-byte ids, a byte -> id table for ASCII chunks: bytes.translate maps them at memory speed.
    ascii_ids = bytes(tokenizer.chars.find(chr(b)) % 256 for b in range(256)) if dtype == np.uint8 else None
    with _new_file(tokens_path) as out:
        for chunk in _chunks(path):
            if ascii_ids and chunk.isascii():
                out.write(chunk.encode("ascii").translate(ascii_ids))
            else:
                out.write(tokenizer.encode(chunk).astype(dtype).tobytes())


@contextlib.contextmanager
def _new_file(path: str):
    """Write a cache file atomically: processes of a run sharing the cache (on one host or several) may
    write the same file at the same time."""
    try:
        with atomic_file(path, "wb") as f:
            yield f
    except OSError as e:
        raise OrpheusError(f"cannot write the token cache {path}: {os_reason(e)}") from None
