"""Character tokenizer: the sorted set of characters of the training text, as in the seed."""

import json

import numpy as np

from orpheus_jax import OrpheusError
from orpheus_jax.fileio import write_atomically


class CharTokenizer:
    def __init__(self, chars: str):
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        self._lookup = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise OrpheusError(f"{len(unknown)} character(s) not in the vocabulary: {shown}")
        # Table lookup over code points: a Python loop over 800k characters takes a second.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort(self._lookup)
        return order[np.searchsorted(self._lookup[order], codes)].astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def save(self, path: str) -> None:
        write_atomically(path, json.dumps({"chars": self.chars}))

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        try:
            with open(path) as f:
                return cls(json.load(f)["chars"])
        except (OSError, ValueError, KeyError) as e:
            raise OrpheusError(f"cannot read tokenizer {path}: {e}") from None
