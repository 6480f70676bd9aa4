import http.server
import threading

import jax
import numpy as np
import pytest

from orpheus_jax import OrpheusError, data
from orpheus_jax.tokenizer import CharTokenizer

FAKE_GUTENBERG = (
    "\ufeffThe Project Gutenberg eBook of The Iliad\r\n"
    "This eBook is for the use of anyone anywhere.\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK THE ILIAD ***\r\n"
    "\r\n"
    "Sing, O goddess, the anger of Achilles son of Peleus,\r\n"
    "that brought countless ills upon the Achaeans.\r\n"
    "\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK THE ILIAD ***\r\n"
    "Updated editions will replace the previous one.\r\n"
)
STRIPPED = ("Sing, O goddess, the anger of Achilles son of Peleus,\n"
            "that brought countless ills upon the Achaeans.\n")


def test_tokenizer_round_trip(iliad_path, tmp_path):
    text = open(iliad_path, encoding="utf-8").read()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 66
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() == 0 and ids.max() == 65
    assert tok.decode(ids) == text
    assert ids[0] == tok.chars.index(text[0])  # sorted-vocabulary ids, as in the seed
    tok.save(str(tmp_path / "tok.json"))
    assert CharTokenizer.load(str(tmp_path / "tok.json")).chars == tok.chars


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(OrpheusError, match=r"2 character\(s\) not in the vocabulary: 'x', 'z'"):
        tok.encode("abzx")


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORPHEUS_DATA_URL", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("ORPHEUS_DATA", "/from/env.txt")
    assert data.resolve_corpus("/from/flag.txt") == "/from/flag.txt"
    assert data.resolve_corpus(None) == "/from/env.txt"
    monkeypatch.delenv("ORPHEUS_DATA")
    with pytest.raises(OrpheusError, match="pass --data FILE"):  # nothing cached, offline
        data.resolve_corpus(None)
    cached = tmp_path / "cache" / "iliad.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached text")
    assert data.resolve_corpus(None) == str(cached)


@pytest.fixture
def gutenberg_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = FAKE_GUTENBERG.encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/pg2199.txt"
    server.shutdown()


def test_download_strips_gutenberg_header_and_footer(gutenberg_server, tmp_path, monkeypatch):
    monkeypatch.delenv("ORPHEUS_DATA", raising=False)
    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path))
    monkeypatch.setenv("ORPHEUS_DATA_URL", gutenberg_server)
    path = data.resolve_corpus(None)
    assert path == str(tmp_path / "iliad.txt")
    assert open(path, encoding="utf-8").read() == STRIPPED
    monkeypatch.setenv("ORPHEUS_DATA_URL", "http://127.0.0.1:9/gone")  # the cache now answers
    assert data.resolve_corpus(None) == path


def test_strip_rejects_text_without_markers():
    with pytest.raises(OrpheusError, match="START/END markers"):
        data.strip_gutenberg("just some text\n")


def test_read_text_errors(tmp_path):
    with pytest.raises(OrpheusError, match="not found"):
        data.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OrpheusError, match="empty"):
        data.read_text(str(tmp_path / "empty.txt"))


def test_split_is_the_seeds_and_checks_length():
    tokens = np.arange(1000)
    train, val = data.split(tokens, 0.1, 8)
    assert len(train) == 900 and len(val) == 100 and val[0] == 900
    with pytest.raises(OrpheusError, match="validation split has 100 characters"):
        data.split(tokens, 0.1, 100)


def test_sample_batch_draws_seeded_windows():
    tokens = np.arange(500, dtype=np.int32)
    x, y = data.sample_batch(jax.numpy.asarray(tokens), jax.random.key(0), 16, 10)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape == (16, 10)
    np.testing.assert_array_equal(y, x + 1)  # targets are inputs shifted by one character
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(10))  # contiguous windows
    assert x.min() >= 0 and y.max() <= 499
    x2, _ = data.sample_batch(jax.numpy.asarray(tokens), jax.random.key(0), 16, 10)
    x3, _ = data.sample_batch(jax.numpy.asarray(tokens), jax.random.key(1), 16, 10)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)
