"""Drafts for speculative decoding: the device lookups against brute-force NumPy searches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from orpheus_jax.drafts import (
    build_index,
    draft,
    load_index,
    lookup_text,
    lookup_window,
    reversed_suffix_array,
    save_index,
)
from orpheus_jax.tokenizer import CharTokenizer

K = 6  # drafts per row in the random tests
jit_text = jax.jit(lookup_text, static_argnames=("n_draft", "max_match"))
jit_window = jax.jit(lookup_window, static_argnames=("n_draft", "max_match"))
jit_draft = jax.jit(draft, static_argnames=("n_draft", "max_match"))


def on_device(index):
    return {name: jnp.asarray(a) for name, a in index.items()}


def text_matches(text, context, max_match):
    """(m, ends): the longest m <= max_match such that context's last m tokens occur in text, and the
    positions where those occurrences end (all of them; m = 0: every position)."""
    for m in range(min(len(context), max_match, len(text)), 0, -1):
        starts = np.flatnonzero((sliding_window_view(text, m) == context[len(context) - m :]).all(axis=1))
        if len(starts):
            return m, list(starts + m - 1)
    return 0, list(range(len(text)))


def window_matches(context, max_match):
    """(m, ends): the longest m <= max_match such that context's last m tokens also end at an earlier
    position e < len(context) - 1, and those positions."""
    last = len(context) - 1
    best, ends = 0, []
    for e in range(last):
        m = 0
        while m < max_match and e - m >= 0 and context[e - m] == context[last - m]:
            m += 1
        if m > best:
            best, ends = m, []
        if m == best and m > 0:
            ends.append(e)
    return best, ends


def follows_text(drafts, text, ends):
    """Do the drafts equal the tokens after some end position, as far as the text goes?"""
    return any(np.array_equal(drafts[: len(text) - 1 - e], text[e + 1 : e + 1 + len(drafts)]) for e in ends)


def follows_window(drafts, context, ends):
    """Do the drafts copy context[e + 1:] for some end e, repeating it past the context's end?"""
    last = len(context) - 1
    return any(
        np.array_equal(drafts, [context[e + 1 + i % (last - e)] for i in range(len(drafts))]) for e in ends
    )


def random_case(rng, n_text, batch, L, alphabet):
    """A text over `alphabet` symbols and a batch of windows: some rows copied from the text (long
    matches), some random; positions past `length` hold garbage (other symbols)."""
    text = rng.integers(0, alphabet, n_text).astype(np.uint8)
    window = rng.integers(0, alphabet + 3, (batch, L)).astype(np.int32)
    for row in range(0, batch, 2):
        start = rng.integers(0, max(n_text - L, 1))
        piece = text[start : start + L]
        window[row, : len(piece)] = piece
    return text, window


@pytest.mark.parametrize("n_text", [1, 9, 200])
def test_reversed_suffix_array_is_sorted(n_text):
    rng = np.random.default_rng(n_text)
    for alphabet in (1, 2, 3, 300):  # 1: one repeated symbol, the doubling's worst case; 300: uint16
        tokens = rng.integers(0, alphabet, n_text)
        r = list(tokens[::-1])
        expected = sorted(range(n_text), key=lambda p: r[p:])
        np.testing.assert_array_equal(reversed_suffix_array(tokens), expected)


def test_build_index_arrays():
    index = build_index(np.array([3, 1, 3, 3, 0], np.int64))
    assert index["text"].dtype == np.uint8 and index["suffix_array"].dtype == np.int32
    assert index["most_frequent"] == 3
    assert build_index(np.array([0, 300], np.int32))["text"].dtype == np.uint16
    assert build_index(np.array([0, 70_000], np.int32))["text"].dtype == np.int32
    for bad in (np.array([], np.int32), np.array([1, -1]), np.zeros((2, 2), np.int32), np.array([0.5])):
        with pytest.raises(ValueError):
            build_index(bad)


@pytest.mark.parametrize("n_text, alphabet, max_match", [(1, 2, 16), (9, 2, 16), (200, 3, 16), (200, 2, 5)])
def test_text_lookup_equals_brute_force(n_text, alphabet, max_match):
    rng = np.random.default_rng(n_text + max_match)
    batch, L = 4, 24
    for _ in range(12):
        text, window = random_case(rng, n_text, batch, L, alphabet)
        index = on_device(build_index(text))
        for length in (1, 3, max_match, L):  # shorter and longer than max_match
            drafts, match = jit_text(index, window, np.int32(length), n_draft=K, max_match=max_match)
            drafts, match = np.asarray(drafts), np.asarray(match)
            for row in range(batch):
                m, ends = text_matches(text, window[row, :length], max_match)
                assert match[row] == m, (text, window[row, :length])
                assert follows_text(drafts[row], text, ends), (text, window[row, :length], drafts[row])


@pytest.mark.parametrize("alphabet, max_match, L", [(2, 16, 40), (3, 4, 40), (5, 16, 40), (2, 16, 9)])
def test_window_lookup_equals_brute_force(alphabet, max_match, L):
    rng = np.random.default_rng(alphabet + max_match + L)
    batch = 5
    for _ in range(10):
        # Garbage past `length` is any symbol, including those of the context: it must never match.
        window = rng.integers(0, alphabet, (batch, L)).astype(np.int32)
        for length in sorted({1, 2, 3, 7, min(23, L), L}):
            drafts, match = jit_window(window, np.int32(length), n_draft=K, max_match=max_match)
            drafts, match = np.asarray(drafts), np.asarray(match)
            for row in range(batch):
                m, ends = window_matches(window[row, :length], max_match)
                assert match[row] == m, (window[row, :length], match[row], m)
                if m:
                    assert follows_window(drafts[row], window[row, :length], ends), (
                        window[row, :length],
                        drafts[row],
                    )


def test_draft_takes_the_longer_match_the_text_on_ties():
    rng = np.random.default_rng(7)
    batch, L, max_match = 6, 20, 8
    seen = {"text": 0, "window": 0, "tie": 0, "none": 0}
    for _ in range(12):
        text, window = random_case(rng, 60, batch, L, 3)
        window[-1, :] = 9  # a symbol the text lacks: no match in the text, and none in a 1-token context
        index = on_device(build_index(text))
        for length in (1, 5, L):
            drafts, match = jit_draft(index, window, np.int32(length), n_draft=K, max_match=max_match)
            drafts, match = np.asarray(drafts), np.asarray(match)
            for row in range(batch):
                context = window[row, :length]
                t, t_ends = text_matches(text, context, max_match)
                w, w_ends = window_matches(context, max_match)
                assert match[row] == max(t, w)
                if t == w == 0:
                    seen["none"] += 1
                    np.testing.assert_array_equal(drafts[row], np.bincount(text).argmax())
                elif t >= w:
                    seen["tie" if t == w else "text"] += 1
                    assert follows_text(drafts[row], text, t_ends)
                else:
                    seen["window"] += 1
                    assert follows_window(drafts[row], context, w_ends)
    assert min(seen.values()) > 0, seen  # every branch was tested


def test_rows_are_independent_and_vmap_agrees():
    rng = np.random.default_rng(11)
    text, window = random_case(rng, 300, 8, 32, 4)
    index = on_device(build_index(text))
    drafts, match = jit_draft(index, window, np.int32(29), n_draft=K)
    assert len({tuple(r) for r in np.asarray(drafts)}) > 1  # the rows differ
    for row in range(8):
        one_d, one_m = jit_draft(index, window[row : row + 1], np.int32(29), n_draft=K)
        np.testing.assert_array_equal(one_d[0], drafts[row])
        assert one_m[0] == match[row]
    # vmap over a leading axis, one row per call: the same drafts.
    mapped = jax.jit(jax.vmap(lambda w: draft(index, w, jnp.int32(29), n_draft=K)))(
        jnp.asarray(window)[:, None]
    )
    np.testing.assert_array_equal(mapped[0][:, 0], drafts)
    np.testing.assert_array_equal(mapped[1][:, 0], match)


def test_jit_compiles_once_for_every_length():
    traces = []

    @jax.jit
    def counted(index, window, length):
        traces.append(1)
        return draft(index, window, length, n_draft=4)

    text, window = random_case(np.random.default_rng(3), 100, 2, 16, 3)
    index = on_device(build_index(text))
    for length in range(1, 17):
        counted(index, window, np.int32(length))
    assert len(traces) == 1


def continuation_counts(text, context, max_match):
    """NumPy: {next token: count} over every occurrence of the context's longest suffix match."""
    m, ends = text_matches(text, context, max_match)
    return m, np.bincount([text[e + 1] for e in ends if e + 1 < len(text)], minlength=int(text.max()) + 1)


def test_text_drafts_the_most_frequent_continuation_of_the_longest_match():
    # "ab" goes on as "abc" three times, "abd" once, "abce" twice, "abcf" once: the drafts after a
    # context ending in "ab" are c then e (a single occurrence would have drafted d or f as well).
    a, b, c, d, e, f, x = range(7)
    text = np.array([x, a, b, c, e, x, a, b, d, x, a, b, c, f, x, a, b, c, e, x], np.uint8)
    window = np.array([[x, x, a, b] + [0] * 4], np.int32)
    drafts, match = jit_text(on_device(build_index(text)), window, np.int32(4), n_draft=2, max_match=8)
    assert int(match[0]) == 3 and np.asarray(drafts[0]).tolist() == [c, e]


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_drafts_perturbed_by_gumbel_noise_are_draws_of_the_texts_continuations(temperature):
    """With the noise of a categorical draw (times the temperature), the first draft is that draw from
    the continuations' counts: argmax(log count / T + noise), checked against NumPy for every key, and
    over many keys its frequencies are the counts' tempered distribution."""
    rng = np.random.default_rng(3)
    text = rng.integers(0, 4, 120).astype(np.uint8)
    context = text[40:43]  # 3 tokens: a match with several continuations
    m, counts = continuation_counts(text, context, 16)
    assert m == 3 and 1 < np.count_nonzero(counts) and counts.sum() <= 32  # all within the neighbours
    n_keys = 4000
    noise = np.asarray(jax.random.gumbel(jax.random.key(0), (n_keys, 1, 1, 4)))  # (keys, B, K, V)
    window = np.zeros((1, 8), np.int32)
    window[0, :3] = context
    window, index = jnp.asarray(window), on_device(build_index(text))
    lookup = jax.jit(jax.vmap(lambda g: lookup_text(index, window, np.int32(3), 1, perturb_BKV=g)))
    drafts = np.asarray(lookup(jnp.asarray(noise * temperature))[0])[:, 0, 0]
    with np.errstate(divide="ignore"):
        expected = np.argmax(np.log(counts) / temperature + noise[:, 0, 0], axis=1)
    np.testing.assert_array_equal(drafts, expected)
    tempered = counts ** (1 / temperature) / np.sum(counts ** (1 / temperature))
    np.testing.assert_allclose(np.bincount(drafts, minlength=4) / n_keys, tempered, atol=0.025)


@pytest.fixture(scope="module")
def iliad(iliad_path):
    with open(iliad_path, encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.from_text(text)
    return text, tokenizer, build_index(tokenizer.encode(text))


def occurrences(text: str, piece: str):
    i = text.find(piece)
    while i >= 0:
        yield i
        i = text.find(piece, i + 1)


def iliad_drafts(index, tokenizer, context, n_draft=8):
    window = np.zeros((1, 64), np.int32)
    window[0, : len(context)] = tokenizer.encode(context)
    drafts, match = jit_draft(on_device(index), window, np.int32(len(context)), n_draft=n_draft)
    return tokenizer.decode(drafts[0]), int(match[0])


def test_iliad_context_drafts_the_text_continuation(iliad):
    text, tokenizer, index = iliad
    # A context copied from the text, ending mid-word: every occurrence of its last 16 characters goes
    # on the same way (checked here), so whichever occurrence the search finds drafts it.
    phrase, cut = "aegis-bearing Jove", len("aegis-bea")
    assert text.count(phrase) >= 20
    end = text.index(phrase, len(text) // 2) + cut
    context = text[end - 40 : end]
    assert {text[i + 16 : i + 24] for i in occurrences(text, context[-16:])} == {"ring Jov"}
    assert iliad_drafts(index, tokenizer, context) == ("ring Jov", 16)
    # Not from the text: "son of Atre" is always followed by "us".
    assert text.count("son of Atre") == text.count("son of Atreus") >= 50
    drafted, match = iliad_drafts(index, tokenizer, "Then spoke the mighty son of Atre")
    assert drafted.startswith("us") and match >= len("son of Atre")


def test_iliad_prompt_lookup_copies_a_new_name(iliad):
    """A name the Iliad lacks, repeated in the prompt: the window's match is longer than the text's."""
    text, tokenizer, index = iliad
    context = "and Kyrmetrios answered him, saying: Kyrmet"
    assert "yrmet" not in text
    assert iliad_drafts(index, tokenizer, context) == ("rios ans", len(" Kyrmet"))


def test_index_round_trips_through_savez(tmp_path):
    rng = np.random.default_rng(5)
    text, window = random_case(rng, 500, 3, 24, 4)
    index = build_index(text)
    np.savez(tmp_path / "index.npz", **index)
    with np.load(tmp_path / "index.npz") as saved:
        loaded = {name: saved[name] for name in saved.files}
    assert loaded.keys() == index.keys()
    for name in index:
        assert loaded[name].dtype == index[name].dtype
        np.testing.assert_array_equal(loaded[name], index[name])
    before = jit_draft(on_device(index), window, np.int32(20), n_draft=K)
    after = jit_draft(on_device(loaded), window, np.int32(20), n_draft=K)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_without_an_index_the_context_alone_drafts():
    """index None (a run without drafts.npz): the window's lookup, and with no match the last token."""
    rng = np.random.default_rng(13)
    window = rng.integers(0, 3, (6, 20)).astype(np.int32)
    window[-1, :] = np.arange(20)  # no token repeats: no match anywhere
    for length in (1, 4, 20):
        drafts, match = jax.jit(draft, static_argnames=("n_draft", "max_match"))(
            None, window, np.int32(length), n_draft=K
        )
        drafts, match = np.asarray(drafts), np.asarray(match)
        for row in range(6):
            context = window[row, :length]
            m, ends = window_matches(context, 16)
            assert match[row] == m
            if m:
                assert follows_window(drafts[row], context, ends)
            else:
                np.testing.assert_array_equal(drafts[row], context[-1])


def test_save_and_load_index(tmp_path):
    text = np.random.default_rng(6).integers(0, 5, 300).astype(np.uint8)
    index = build_index(text)
    path = str(tmp_path / "drafts.npz")
    save_index(path, index)
    loaded = load_index(path)
    for name in index:
        np.testing.assert_array_equal(loaded[name], index[name])
        assert loaded[name].dtype == index[name].dtype
    assert [p.name for p in tmp_path.iterdir()] == ["drafts.npz"]  # no temporary file left
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a draft index"):
        load_index(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "short.npz", **dict(index, suffix_array=index["suffix_array"][:10]))
    with pytest.raises(ValueError, match="not a draft index"):
        load_index(str(tmp_path / "short.npz"))
