"""The token cache: ids exactly as CharTokenizer.encode of the whole text, in the smallest type, kept once."""

import os

import numpy as np
import pytest

from orpheus_jax import OrpheusError, token_cache
from orpheus_jax.tokenizer import CharTokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def reference(path):
    """The whole text read at once and encoded at once: what the cache must reproduce."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.from_text(text)
    return tokenizer, tokenizer.encode(text)


def test_iliad_is_cached_as_uint8_and_memory_mapped(iliad_path, cache, capsys):
    tokenizer, tokens = token_cache.load(iliad_path)
    expected_tokenizer, expected = reference(iliad_path)
    assert tokenizer.chars == expected_tokenizer.chars and tokenizer.vocab_size == 66
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8
    np.testing.assert_array_equal(tokens, expected)
    assert "Tokenizing" in capsys.readouterr().out
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and os.path.getsize(os.path.join(cache, files[0])) == len(expected)

    again_tokenizer, again = token_cache.load(iliad_path)  # the second time: hash, then the memory map
    assert "Tokenizing" not in capsys.readouterr().out and sorted(os.listdir(cache)) == files
    assert again_tokenizer.chars == tokenizer.chars
    np.testing.assert_array_equal(again, expected)


def test_chunks_boundaries_newlines_and_non_ascii(tmp_path, monkeypatch):
    """Chunks of 7 characters: ASCII ones (the byte table) and others (the tokenizer) interleave, and CRLF
    pairs fall across chunk ends; newlines are universal, as read_text reads them."""
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 7)
    path = tmp_path / "mixed.txt"
    greek = "\u1f08\u03c7\u03b9\u03bb\u03bb\u03b5\u03cd\u03c2"
    path.write_bytes(
        f"Sing, O goddess\r\nthe anger\rof Achilles {greek} \u00e9\n".encode() * 5
        + b"ascii only tail, long enough for a chunk of its own\r\n"
    )
    tokenizer, tokens = token_cache.load(str(path))
    expected_tokenizer, expected = reference(path)
    assert tokenizer.chars == expected_tokenizer.chars and "\r" not in tokenizer.chars
    np.testing.assert_array_equal(tokens, expected)


def test_a_resumed_vocabulary_is_another_token_file(tmp_path, cache):
    path = tmp_path / "t.txt"
    path.write_text("abcabc\n")
    own, own_tokens = token_cache.load(str(path))
    wider = CharTokenizer("\n abcdef")
    same, tokens = token_cache.load(str(path), wider)
    assert same is wider
    np.testing.assert_array_equal(tokens, wider.encode("abcabc\n"))
    np.testing.assert_array_equal(own_tokens, own.encode("abcabc\n"))
    assert len([f for f in os.listdir(cache) if f.endswith(".uint8")]) == 2
    with pytest.raises(OrpheusError, match=r"1 character\(s\) not in the vocabulary: 'c'"):
        token_cache.load(str(path), CharTokenizer("\nab"))


def test_wide_vocabularies_take_wider_types():
    assert token_cache.token_dtype(66) == np.uint8 and token_cache.token_dtype(256) == np.uint8
    assert token_cache.token_dtype(257) == np.uint16 and token_cache.token_dtype(70_000) == np.uint32


def test_errors(tmp_path):
    with pytest.raises(OrpheusError, match="data file not found"):
        token_cache.load(str(tmp_path / "missing.txt"))
    with pytest.raises(OrpheusError, match="is a directory"):
        token_cache.load(str(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OrpheusError, match="data file is empty"):
        token_cache.load(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"x" * 5000 + "caf\u00e9".encode("latin-1"))
    with pytest.raises(OrpheusError, match=r"not UTF-8 text: .*unexpected end of data at byte 5003\)"):
        token_cache.load(str(tmp_path / "latin1.txt"))
    (tmp_path / "bad.txt").write_bytes(b"y" * 3000 + b"\xff" + b"z" * 3000)
    with pytest.raises(OrpheusError, match=r"invalid start byte at byte 3000\)"):
        token_cache.load(str(tmp_path / "bad.txt"))
