import http.server
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from orpheus_jax import OrpheusError, data
from orpheus_jax.metrics import read_jsonl
from orpheus_jax.sharding import make_mesh
from orpheus_jax.tokenizer import CharTokenizer
from orpheus_jax.train import train

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
STRIPPED = (
    "Sing, O goddess, the anger of Achilles son of Peleus,\nthat brought countless ills upon the Achaeans.\n"
)


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


# --- splits beyond the device budget: windows cut on the host -------------------------------------


def test_a_split_within_the_budget_is_on_every_device_in_its_own_type(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "tokens.uint16")
    tokens = np.memmap(tmp_path / "tokens.uint16", np.uint16, mode="r")[1000:]
    mesh = make_mesh()
    placed = data.place(tokens, mesh, budget_bytes=tokens.nbytes, batch_size=8, block_size=16)
    assert placed.dtype == np.uint16 and placed.sharding.is_fully_replicated and len(placed.devices()) == 8
    np.testing.assert_array_equal(np.asarray(placed), np.arange(1000, 3000))
    assert isinstance(data.place(tokens, mesh, tokens.nbytes - 1, 8, 16), data.HostSplit)


@pytest.mark.parametrize(
    "grad_accum_steps, prng_impl", [(1, "threefry2x32"), (2, "threefry2x32"), (2, "rbg")]
)
def test_host_windows_equal_the_device_windows(grad_accum_steps, prng_impl, monkeypatch, tmp_path):
    """Steps 3..10 drawn in blocks of 4 steps on the host; each step's windows on the device as the step
    cuts them."""
    monkeypatch.setattr(data.HostSplit, "DRAW_STEPS", 4)
    everything = np.random.default_rng(0).integers(0, 66, 6000).astype(np.uint8)
    everything.tofile(tmp_path / "tokens.uint8")
    tokens = np.memmap(tmp_path / "tokens.uint8", np.uint8, mode="r")[
        1000:
    ]  # a split: an offset into the file
    mesh = make_mesh()
    host = data.HostSplit(tokens, mesh, batch_size=8, block_size=16)
    key = jax.random.key(7, impl=prng_impl)
    on_device = data.to_device(tokens, mesh)
    cut = jax.jit(lambda k: data.sample_windows(on_device, k, 8, 16))
    for first, n in ((3, 2), (5, 3), (8, 3)):  # the last call crosses into a new block
        windows = host.train_windows(key, first, n, grad_accum_steps)
        assert windows.shape == (n, grad_accum_steps, 8, 17) and windows.dtype == np.uint8
        assert windows.sharding.spec == P(
            None, None, "data"
        )  # rows split over the devices, like the device batch
        for i in range(n):
            batch_keys_G, _ = data.step_keys(key, first + i, grad_accum_steps)
            for g in range(grad_accum_steps):
                np.testing.assert_array_equal(np.asarray(windows[i, g]), np.asarray(cut(batch_keys_G[g])))
    eval_keys = jax.random.split(jax.random.key(3, impl=prng_impl), 5)
    eval_windows = np.asarray(host.eval_windows(eval_keys))
    for c in range(5):
        np.testing.assert_array_equal(eval_windows[c], np.asarray(cut(eval_keys[c])))
    for window in eval_windows.reshape(-1, 17):  # windows are runs of the split (a NumPy search)
        assert tokens.tobytes().find(window.tobytes()) >= 0


@pytest.mark.slow
def test_training_from_the_host_equals_training_on_the_device(tiny_cfg, small_text_path, tmp_path):
    """device_data_budget 0: both splits batched on the host; the same run, number for number."""
    tiny_cfg.update(
        max_iters=4,
        steps_per_call=2,
        grad_accum_steps=2,
        log_interval=2,
        eval_interval=4,
        checkpoint_interval=4,
    )
    on_device = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "device"), small_text_path)
    tiny_cfg.device_data_budget = 0
    on_host = train(tiny_cfg, str(tmp_path / "host"), small_text_path)
    device_log, host_log = (read_jsonl(str(tmp_path / name / "metrics.jsonl")) for name in ("device", "host"))
    assert [r.keys() for r in host_log] == [r.keys() for r in device_log] and len(host_log) == 4
    for host_record, device_record in zip(host_log, device_log):
        for key in ("loss", "train_loss", "val_loss"):
            if key in device_record:
                assert host_record[key] == pytest.approx(device_record[key], abs=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), on_host.params, on_device.params
    )
