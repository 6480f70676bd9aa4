"""Speculative decoding changes nothing but speed: on a trained tiny run, in float32, the text equals the
plain sampler's token for token (seeds, temperatures, top-k/top-p, batch 1 and 3, refills, --stop), and
the drafts are really kept (passes yield more than one token)."""

import dataclasses
import importlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_runner import run

from orpheus_jax import data, rundir
from orpheus_jax.checkpoint import load_run
from orpheus_jax.drafts import build_index, load_index
from orpheus_jax.model import GPTConfig, empty_buffers, forward, forward_cached, init_params
from orpheus_jax.sampler import FIRST_CHUNK, Sampler, drafting_pays
from orpheus_jax.sharding import make_mesh
from orpheus_jax.tokenizer import CharTokenizer

DRAFT_LEN = 6
PROMPT = "Achilles"  # the tiny run's block is 32 characters: 120 new ones refill several times
LONG_PROMPT = "Sing, O goddess, the anger of Achilles son of Peleus, that brought"  # longer than a block


@pytest.fixture(scope="module")
def tiny(tiny_run):
    run = load_run(tiny_run)
    return run, load_index(rundir.drafts_path(tiny_run))


@pytest.fixture(scope="module")
def samplers(tiny):
    """(plain, speculative) samplers of the tiny run for each (batch, shift), built on first use."""
    run, index = tiny
    mesh = make_mesh(jax.devices()[:1])
    plain, spec = {}, {}

    def get(batch, shift=None, draft_index=index):
        settings = dict(batch_size=batch, chunk=16, shift=shift, prng_impl=run.cfg.prng_impl, mesh=mesh)
        if (batch, shift) not in plain:
            plain[batch, shift] = Sampler(run.model_cfg, run.params, **settings)
        key = (batch, shift, draft_index is None)
        if key not in spec:
            spec[key] = Sampler(
                run.model_cfg, run.params, draft_len=DRAFT_LEN, draft_index=draft_index, **settings
            )
        return plain[batch, shift], spec[key]

    return get


def tokens_of(sampler, prompt_ids, n, seed, rows, **settings):
    return np.concatenate(list(sampler.generate(prompt_ids, n, seed, rows, **settings)), axis=1)


def test_training_writes_the_index_of_its_training_split(tiny_run, small_text_path):
    tokenizer = CharTokenizer.load(rundir.tokenizer_path(tiny_run))
    with open(small_text_path, encoding="utf-8") as f:
        tokens = tokenizer.encode(f.read())
    train_tokens, _ = data.split(tokens, 0.1, 32)  # tiny's val_fraction and block_size
    expected = build_index(np.asarray(train_tokens))
    saved = load_index(rundir.drafts_path(tiny_run))
    for name in expected:
        np.testing.assert_array_equal(saved[name], expected[name])
        assert saved[name].dtype == expected[name].dtype


@pytest.mark.parametrize(
    "batch, seed, settings",
    [
        (1, 0, dict(temperature=0.8)),
        (1, 1, dict(temperature=0.0)),
        (1, 2, dict(temperature=1.0)),
        (1, 3, dict(temperature=0.8, top_k=5)),
        (1, 4, dict(temperature=1.0, top_p=0.9)),
        (3, 5, dict(temperature=0.8)),  # rows keep different numbers of drafts: they move in lockstep
        (3, 6, dict(temperature=0.0, top_k=3, top_p=0.8)),
    ],
)
def test_speculative_text_equals_the_plain_samplers(tiny, samplers, batch, seed, settings):
    run, _ = tiny
    plain, spec = samplers(batch)
    rows = list(range(2, 2 + batch))
    spec.stats = {"passes": 0, "tokens": 0}
    for prompt in (PROMPT, LONG_PROMPT):
        ids = run.tokenizer.encode(prompt)
        expected = tokens_of(plain, ids, 120, seed, rows, **settings)
        np.testing.assert_array_equal(tokens_of(spec, ids, 120, seed, rows, **settings), expected)
    # The drafts were checked and some kept (the tiny run is weak: at 0.8, about one pass in ten).
    assert spec.stats["tokens"] > spec.stats["passes"] > 0, spec.stats


def test_greedy_with_shift_1_equals_a_full_recompute_per_token(tiny, samplers):
    """With shift 1 every token past the first block refills: speculation only until the buffer first
    fills, then plain steps, as the seed's crop-and-recompute (recomputed here with full passes)."""
    run, _ = tiny
    _, spec = samplers(1, shift=1)
    ids = run.tokenizer.encode(PROMPT)
    got = tokens_of(spec, ids, 60, 0, [0], temperature=0.0)[0].tolist()
    L = run.model_cfg.block_size
    # One full pass over the last L tokens (padded at the end: causal, so padding is never seen).
    last_logits = jax.jit(lambda w, n: forward(run.model_cfg, run.params, w)[0, n - 1])
    context = list(ids)
    for _ in range(60):
        window = context[-L:]
        padded = jnp.asarray([window + [0] * (L - len(window))], jnp.int32)
        context.append(int(jnp.argmax(last_logits(padded, len(window)))))
    assert got == context[len(ids) :]


def test_drafting_from_the_context_alone_changes_nothing_either(tiny, samplers):
    """A run without an index (older runs, imported weights) drafts from the prompt and output only."""
    run, _ = tiny
    plain, spec = samplers(1, draft_index=None)
    spec.stats = {"passes": 0, "tokens": 0}
    # A repeated line: the context's own earlier copy drafts it.
    ids = run.tokenizer.encode("the ships of the Achaeans, the ships of the")
    expected = tokens_of(plain, ids, 80, 3, [0], temperature=0.8)
    np.testing.assert_array_equal(tokens_of(spec, ids, 80, 3, [0], temperature=0.8), expected)
    assert spec.stats["tokens"] > spec.stats["passes"] > 0


def test_chunks_of_any_length_give_the_same_text(tiny, samplers):
    """Speculative chunks end where the passes do: the text does not depend on how it is cut."""
    run, _ = tiny
    plain, spec = samplers(1)
    ids = run.tokenizer.encode(PROMPT)
    chunks = list(spec.generate(ids, 75, 9, [0], 0.8))
    assert sum(c.shape[1] for c in chunks) == 75
    np.testing.assert_array_equal(
        np.concatenate(chunks, axis=1), tokens_of(plain, ids, 75, 9, [0], temperature=0.8)
    )


def test_draft_len_is_checked(tiny):
    run, index = tiny
    with pytest.raises(ValueError, match="draft_len"):
        Sampler(
            run.model_cfg, run.params, batch_size=1, draft_len=run.model_cfg.block_size, draft_index=index
        )


@pytest.mark.parametrize(
    "config, batch, pays",
    [("iliad_char", 1, True), ("iliad_char", 2, False), ("iliad_char_cpu", 1, False), ("tiny", 1, False)],
)
def test_drafting_is_the_default_for_one_sample_of_a_seed_sized_model(config, batch, pays):
    """sample.py's and the demo's default --draft: measured faster for the seed's 6 x 384 blocks only."""
    cfg = importlib.import_module(f"orpheus_jax.configs.{config}").get_config()
    assert drafting_pays(cfg.n_layer, cfg.n_embd, batch) == pays


def test_the_demo_streams_the_same_text_with_drafts(tiny):
    """The demo drafts for seed-sized models (app.py's tests serve the tiny run, which does not): its
    streamer's text is the same either way."""
    from orpheus_jax.app import TextStreamer

    run, index = tiny
    plain, drafted = TextStreamer(run, draft_len=0), TextStreamer(run, draft_len=DRAFT_LEN, draft_index=index)
    assert drafted.sampler.draft_len == DRAFT_LEN and plain.sampler.draft_len == 0
    for seed, temperature in ((0, 0.8), (5, 1.0)):
        texts = [list(s.stream(PROMPT, 120, temperature, seed=seed))[-1] for s in (plain, drafted)]
        assert texts[0] == texts[1] and len(texts[0]) == len(PROMPT) + 120


def test_a_pass_gives_a_steps_logits_and_buffer_to_float32_rounding():
    """At the seed's width, with a buffer of 4 attention blocks: 17 positions in one pass give the logits,
    keys and values of 17 steps (the pass reads the whole buffer, as a step does)."""
    cfg = GPTConfig(vocab_size=66, n_layer=1, n_head=6, n_embd=384, block_size=256)
    params = jax.tree.map(lambda a: a * 3, init_params(cfg, jax.random.key(0)))  # peaked logits
    call = jax.jit(lambda p, t, c, s: forward_cached(cfg, p, t, c, s))
    tokens = np.random.default_rng(0).integers(0, 66, (1, cfg.block_size)).astype(np.int32)
    prompt = np.where(np.arange(cfg.block_size) < 40, tokens, 0)
    _, cache = call(params, jnp.asarray(prompt), empty_buffers(cfg, 1), 0)
    steps, step_cache = [], cache
    for t in range(40, 57):
        logits, step_cache = call(params, jnp.asarray(tokens[:, t : t + 1]), step_cache, t)
        steps.append(np.asarray(logits)[0, 0])
    logits, pass_cache = call(params, jnp.asarray(tokens[:, 40:57]), cache, 40)
    np.testing.assert_allclose(np.asarray(logits)[0], np.stack(steps), atol=1e-4, rtol=0)
    for (k, v), (k_ref, v_ref) in zip(pass_cache, step_cache):
        np.testing.assert_allclose(np.asarray(k)[:, :57], np.asarray(k_ref)[:, :57], atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(v)[:, :57], np.asarray(v_ref)[:, :57], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sample_py_draft_ngram_prints_what_draft_none_prints(tiny_run, tmp_path, monkeypatch, capsys):
    from orpheus_jax.cli.sample import run_command

    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path))
    common = ["--workdir", tiny_run, "--prompt", PROMPT, "--max_new_tokens", "150", "--temperature", "0.8"]
    outs = []
    for draft in ("none", "ngram"):
        run_command([*common, "--draft", draft])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 150


@pytest.mark.slow
def test_sample_py_speculative_stop_streams_and_batches_equal_plain(tiny_run, tmp_path):
    """--stop, --stream and several samples through the command line, with and without drafts; and a run
    without drafts.npz (copied without it) says so once and prints the same."""
    common = ["--workdir", tiny_run, "--prompt", LONG_PROMPT, "--max_new_tokens", "200", "--num_samples", "3"]
    for extra in (  # batched greedy and streamed top-k sampling, each with a stop text
        ["--stop", " the", "--temperature", "0"],
        ["--stream", "--stop", "\\n", "--top_k", "4"],
    ):
        none = run("sample.py", *common, *extra, "--draft", "none")
        ngram = run("sample.py", *common, *extra, "--draft", "ngram", "--draft_len", "4")
        assert none.returncode == ngram.returncode == 0, none.stderr + ngram.stderr
        assert none.stdout == ngram.stdout, extra
    copy = str(tmp_path / "run")
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("drafts.npz"))
    without = run("sample.py", *common[:1], copy, *common[2:], "--stream", "--draft", "ngram")
    assert without.returncode == 0 and without.stderr.count("no draft index") == 1, without.stderr
    plain = run("sample.py", *common[:1], copy, *common[2:], "--stream", "--draft", "none")
    assert without.stdout == plain.stdout
    assert os.path.exists(rundir.drafts_path(tiny_run)) and not os.path.exists(rundir.drafts_path(copy))


def test_kept_speculative_sampler_loads_and_gives_the_same_text(tiny, tiny_run, tmp_path, monkeypatch):
    from orpheus_jax import sampler_cache

    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path))
    run_, index = tiny
    step = rundir.find_step(tiny_run)
    settings = dict(batch_size=1, chunk=16, draft_len=DRAFT_LEN, draft_index=index)
    first = sampler_cache.kept_sampler(tiny_run, step, **settings)
    expected = tokens_of(first, run_.tokenizer.encode(PROMPT), 90, 4, [0], temperature=0.8)
    kept = sampler_cache.kept_sampler(tiny_run, step, **settings)
    assert kept.model_cfg is None  # loaded, not built: no model config was needed
    np.testing.assert_array_equal(
        tokens_of(kept, run_.tokenizer.encode(PROMPT), 90, 4, [0], temperature=0.8), expected
    )
    # Another index size is another program: not loaded from this entry.
    smaller = build_index(index["text"][:100])
    other = sampler_cache.kept_sampler(tiny_run, step, **dict(settings, draft_index=smaller))
    assert other.model_cfg is not None


class GatedStore:
    """A program store holding another sampler's compiled programs, whose load of speculate ends only
    once `gate` is set (a slow disk, a large program)."""

    def __init__(self, compiled: dict, gate: threading.Event):
        self.compiled, self.gate, self.started, self.futures = compiled, gate, [], {}
        self.pool = ThreadPoolExecutor()

    def _read(self, name):
        if name == "speculate":
            self.gate.wait(timeout=60)
        return self.compiled[name]

    def has(self, name):
        return name in self.compiled

    def start(self, *names):
        for name in names:
            if name not in self.futures:
                self.started.append(name)
                self.futures[name] = self.pool.submit(self._read, name)

    def ready(self, name):
        return self.futures[name].done() if name in self.futures else not self.has(name)

    def load(self, name):
        return self.futures.pop(name).result() if name in self.futures else self._read(name)

    def save(self, name, compiled):
        raise AssertionError(f"{name} was compiled, not loaded")


def test_a_kept_sampler_shows_its_first_chunk_then_decodes_on_while_speculate_loads(tiny, samplers):
    run, index = tiny
    _, spec = samplers(1)
    ids = run.tokenizer.encode(PROMPT)
    expected = tokens_of(spec, ids, 120, 7, [0], temperature=0.8)  # compiles spec's three programs
    gate = threading.Event()
    store = GatedStore(spec._compiled, gate)
    kept = Sampler.from_settings(spec.settings, spec.params, store, make_mesh(jax.devices()[:1]), index)
    chunks = kept.generate(ids, 120, 7, [0], temperature=0.8)
    out = [next(chunks)]
    assert store.started == ["prefill", "decode"]  # speculate's load starts once the first chunk is out
    out += [next(chunks), next(chunks)]
    assert store.started == ["prefill", "decode", "speculate"] and not store.ready("speculate")
    assert kept.stats["passes"] == 0 and all(c.shape[1] <= FIRST_CHUNK for c in out)  # plain, short
    gate.set()
    store.futures["speculate"].result()
    out += list(chunks)
    np.testing.assert_array_equal(np.concatenate(out, axis=1), expected)
    assert kept.stats["passes"] > 0  # speculative once loaded


class EmptyStore:
    """A program store that keeps nothing yet: it records what was compiled and saved, and when."""

    def __init__(self):
        self.saved = []

    def start(self, *names):
        pass

    def has(self, name):
        return False

    def ready(self, name):
        return True

    def load(self, name):
        return None

    def save(self, name, compiled):
        self.saved.append(name)


def test_a_first_run_shows_its_first_chunk_before_compiling_speculate(tiny, samplers):
    run, index = tiny
    _, spec = samplers(1)
    ids = run.tokenizer.encode(PROMPT)
    expected = tokens_of(spec, ids, 120, 8, [0], temperature=0.8)
    store = EmptyStore()
    first_run = Sampler(
        run.model_cfg, run.params, batch_size=1, chunk=16, prng_impl=run.cfg.prng_impl,
        mesh=make_mesh(jax.devices()[:1]), draft_len=DRAFT_LEN, draft_index=index, store=store,
    )  # fmt: skip
    chunks = first_run.generate(ids, 120, 8, [0], temperature=0.8)
    out = [next(chunks)]
    assert store.saved == ["prefill", "decode"]  # speculate: compiled only after the first chunk is out
    out += list(chunks)
    assert store.saved == ["prefill", "decode", "speculate"] and first_run.stats["passes"] > 0
    np.testing.assert_array_equal(np.concatenate(out, axis=1), expected)


def test_settings_of_a_kept_sampler_name_its_index(tiny):
    run, index = tiny
    sampler = Sampler(run.model_cfg, run.params, batch_size=1, draft_len=4, draft_index=index)
    assert sampler.settings["draft_index"] == [len(index["text"]), index["text"].dtype.name]
    with pytest.raises(ValueError, match="draft index"):
        Sampler.from_settings(sampler.settings, sampler.params, None, draft_index=None)
    plain = Sampler(run.model_cfg, run.params, batch_size=1)
    assert plain.settings["draft_index"] is None and plain.programs() == ("prefill", "decode")
    assert dataclasses.asdict(run.model_cfg) == sampler.settings["model"]


@pytest.mark.slow
def test_a_kept_program_built_after_an_int8_cast_still_runs_in_a_later_process(tiny_run, tmp_path):
    """int8 weights are cast before any program compiles, which made JAX use its compilation cache for
    the whole process: --draft ngram's prefill then came from that cache (--draft none had put it
    there) and its kept copy failed to run in the next process ("Function ... not found")."""
    env = {"ORPHEUS_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": ""}  # the cache empty at first
    common = ["--workdir", tiny_run, "--prompt", PROMPT, "--max_new_tokens", "60", "--weights", "int8"]
    outs = [run("sample.py", *common, "--draft", draft, env=env) for draft in ("none", "ngram", "ngram")]
    for out in outs:
        assert out.returncode == 0, out.stderr
    assert outs[1].stdout == outs[2].stdout
