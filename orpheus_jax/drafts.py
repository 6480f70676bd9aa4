"""Draft tokens for exact speculative decoding, without a second network: what followed the context's
longest suffix in the training text, or earlier in the row's own context.

A speculative step drafts K tokens, verifies them in one forward pass and keeps those the model's own
sampling agrees with, so drafts never change the output; they only need to be right often and to cost
little inside a compiled decode loop (a decode step of the seed model is ~1.2-1.5 ms on a 2-core CPU).

Design: a suffix array of the REVERSED training text. Read backwards from its last token, the
context is a prefix of a suffix of the reversed text exactly where the context's suffix occurs in the
text, so "the longest suffix of the context that occurs in the text" is a longest-common-prefix query
among sorted strings, answered by one binary search: the string sharing the longest prefix with the
query sits next to its insertion point, and both neighbours are probes of the search, so keeping the
best probe is enough. Why this structure:
  - one index for every match length: no n-gram tables per order, no hashing (and no collisions);
  - a fixed cost: ceil(log2(n + 1)) probes (20 for the Iliad), each gathering max_match tokens per row
    and comparing them at once: no data-dependent loop, so it jits, vmaps and batches, on CPU or GPU;
  - small: the text (1 byte a token for up to 255 symbols) and one int32 a position, 4 MB for the
    Iliad, stored with np.savez as plain integer arrays;
  - quick to build: prefix doubling with NumPy sorts, starting from the first tokens packed into one
    int64 key (9 tokens for 66 symbols), 6 sorts and 0.6 s for the Iliad on a 2-core CPU.
The suffix array is complete (sorted on whole suffixes), so any max_match works with one index.

Which continuation: the longest match may occur many times, going on differently. The suffixes next
to the search's insertion point (NEIGHBOURS of them, read at once) hold up to that many occurrences;
draft j is the next token, among the occurrences that go on as drafts 0 .. j-1 did, with the largest
log(count) + perturbation. Without a perturbation that is the most frequent continuation. The sampler
passes the Gumbel noise of the very draws that will check the drafts (times the temperature): the
draft is then a draw from the continuations' counts coupled to the model's draw, equal to it whenever
the two distributions agree around the noise, so drafts are kept at any temperature, not only when
the model's likeliest token is drawn (the acceptance rule is unchanged, so the text is too).

The match cap (max_match, default 16) bounds the gathers per probe. A character model's next characters
depend on about the last word or two, and past 16 characters a longer match no longer picks a better
continuation: drafting the last 10% of the Iliad from the first 90% (8 drafts, a 256-token context),
the first 1/2/4/8 drafts equal the text at 56.7/35.2/13.1/2.5% of positions with max_match 8,
58.2/36.9/14.7/3.2% with 16, and the same with 32.

Prompt lookup: the longest suffix match of the context within its own earlier positions (a repeated
name, a refrain the model is writing) is found by comparing the context's last max_match tokens with
every earlier position at once (window length x max_match comparisons, no search). What followed it is
copied from positions before `length` only; when the match is recent, the copy runs into the drafts
themselves and repeats with the match's period (what the model would write if the text does repeat).

The source with the longer match wins (ties: the training text). On the Iliad's own text the training
text nearly always matches longer (the context alone gets the first draft right at 27% of positions,
both together at 58.2%, 0.1 more than the text alone); the context's part is for what the training
text lacks: a name or a line of the prompt, repeated. With no match at all (a last token
the text never has), the drafts are the text's most frequent token.

`index` is passed to `draft` as an argument, its arrays put on the device once (jax.device_put): as a
closure constant it would be copied into every compiled program.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from orpheus_jax.fileio import atomic_file

# Tokens of the training text an index holds at most (its first ones): 4 MB of text and 16 MB of
# suffix array, built in a few seconds; the Iliad has 0.7M.
MAX_INDEX_TOKENS = 4 * 2**20
INDEX_ARRAYS = ("text", "suffix_array", "most_frequent")
# Suffixes read around the search's insertion point: the occurrences whose next tokens are counted.
NEIGHBOURS = 32


def _smallest_dtype(max_value: int):
    for dtype in (np.uint8, np.uint16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"token id {max_value} does not fit in int32")


def reversed_suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The start positions of the suffixes of tokens[::-1], in lexicographic order (a suffix before the
    longer ones it begins), by prefix doubling: rank on the first k tokens, then on pairs of ranks k
    apart (2k tokens), until every rank differs."""
    r = np.ascontiguousarray(np.asarray(tokens)[::-1])
    n = len(r)
    symbols, dense = np.unique(r, return_inverse=True)
    # First key: as many leading tokens as fit in 62 bits, each dense id + 1 (0: past the end).
    bits = int(len(symbols)).bit_length()
    k = max(1, 62 // bits)
    key = np.zeros(n, np.int64)
    for j in range(k):
        column = np.zeros(n, np.int64)
        column[: max(n - j, 0)] = dense[j:] + 1
        key = (key << bits) | column
    while True:
        order = np.argsort(key)
        sorted_key = key[order]
        rank = np.empty(n, np.int64)
        rank[order] = np.cumsum(np.concatenate(([0], sorted_key[1:] != sorted_key[:-1])))
        if rank[order[-1]] == n - 1:  # all suffixes ranked apart: sorted
            return order.astype(np.int32)
        if k >= n:  # k tokens hold every suffix whole: ranks must differ by now
            raise AssertionError("suffix ranks not all distinct")
        # Rank on 2k tokens: (rank of the first k, rank of the next k + 1, 0 past the end) < (n + 1)^2.
        second = np.zeros(n, np.int64)
        second[: max(n - k, 0)] = rank[k:] + 1
        key = rank * (n + 1) + second
        k *= 2


def build_index(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """What `draft` needs to look up the training text `tokens` (1-D, non-negative integer ids):
    "text": the tokens in the smallest of uint8, uint16, int32 that holds them; "suffix_array": int32,
    the suffixes of the reversed text in sorted order; "most_frequent": int32 scalar, for no match."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if len(tokens) >= np.iinfo(np.int32).max:
        raise ValueError(f"{len(tokens)} tokens: too many for int32 positions")
    if tokens.min() < 0:
        raise ValueError("token ids must be non-negative")
    text = tokens.astype(_smallest_dtype(int(tokens.max())))
    return {
        "text": text,
        "suffix_array": reversed_suffix_array(text),
        "most_frequent": np.array(np.argmax(np.bincount(text)), np.int32),
    }


def _reversed_context(window_BL, length, max_match: int):
    """(q_BM, n_valid): q_BM[:, j] = window_BL[:, length - 1 - j], valid for j < n_valid."""
    L = window_BL.shape[1]
    n_valid = jnp.minimum(length, max_match)
    positions_M = jnp.clip(length - 1 - jnp.arange(max_match), 0, L - 1)
    return window_BL[:, positions_M].astype(jnp.int32), n_valid


def _common_prefix(a_BM, q_BM, n_valid):
    """(length of the common prefix of a and q along their last axis, capped at n_valid; a < q in
    lexicographic order over the first n_valid tokens), for any leading axes that broadcast. Plain
    min/any reductions: an argmax and take_along_axis cost twice as much on XLA:CPU."""
    M = q_BM.shape[-1]
    j_M = jnp.arange(M, dtype=jnp.int32)
    differs_BM = (a_BM != q_BM) & (j_M < n_valid)
    first_B = jnp.min(jnp.where(differs_BM, j_M, M), axis=-1)  # M: no difference
    less_B = jnp.any((j_M == first_B[..., None]) & (a_BM < q_BM), axis=-1)
    return jnp.minimum(first_B, n_valid), less_B


def lookup_text(index, window_BL, length, n_draft: int, max_match: int = 16, perturb_BKV=None):
    """The training text's part of `draft`: (drafts_BK, match_B), match_B the length of the context's
    longest suffix (at most max_match) that occurs in the text, drafts_BK what followed occurrences of it:
    draft j is the next token of those occurrences (among the NEIGHBOURS suffixes around the search's
    insertion point) whose earlier drafts it continues that maximizes log(count) + perturb_BKV[:, j, token]
    (no perturbation: the most frequent; past the text's end an occurrence reads its last token)."""
    length = jnp.asarray(length, jnp.int32)
    q_BM, n_valid = _reversed_context(window_BL, length, max_match)
    text, suffix_array = jnp.asarray(index["text"]), jnp.asarray(index["suffix_array"])
    n = text.shape[0]
    B, M = q_BM.shape
    offsets_M = jnp.arange(M)

    def reversed_text_at(p_B):  # reversed text from position p (text[n-1-p], text[n-2-p], ...), -1 past it
        idx_BM = n - 1 - p_B[..., None] - offsets_M
        tokens_BM = text.at[jnp.maximum(idx_BM, 0)].get(mode="promise_in_bounds").astype(jnp.int32)
        return jnp.where(idx_BM >= 0, tokens_BM, -1)

    def probe(_, carry):
        lo_B, hi_B, best_B = carry
        mid_B = lo_B + (hi_B - lo_B) // 2
        p_B = suffix_array.at[jnp.minimum(mid_B, n - 1)].get(mode="promise_in_bounds")
        common_B, less_B = _common_prefix(reversed_text_at(p_B), q_BM, n_valid)
        active_B = lo_B < hi_B
        lo_B = jnp.where(active_B & less_B, mid_B + 1, lo_B)
        hi_B = jnp.where(active_B & ~less_B, mid_B, hi_B)
        # The best match is next to the insertion point, and both neighbours are probed (a probe after
        # the search ends is a suffix too, so it cannot spoil the maximum).
        return lo_B, hi_B, jnp.maximum(common_B, best_B)

    zeros_B = jnp.zeros((B,), jnp.int32)
    init = (zeros_B, jnp.full((B,), n, jnp.int32), zeros_B - 1)
    # Unrolled: XLA:CPU then runs the 20 probes of the Iliad 2x (batch 1) to 3x (batch 16) quicker.
    insert_B, _, match_B = lax.fori_loop(0, int(n).bit_length(), probe, init, unroll=True)
    # The suffixes sharing the longest match sit next to the insertion point, on either side or both.
    S = NEIGHBOURS
    wanted_BS = insert_B[:, None] - S // 2 + jnp.arange(S)
    i_BS = jnp.clip(wanted_BS, 0, n - 1)
    p_BS = suffix_array.at[i_BS].get(mode="promise_in_bounds")
    common_BS, _ = _common_prefix(reversed_text_at(p_BS), q_BM[:, None], n_valid)
    # An occurrence ends at text position n - 1 - p: its continuation starts at n - p.
    idx_BSK = jnp.minimum(n - p_BS[..., None] + jnp.arange(n_draft), n - 1)
    next_BSK = text.at[idx_BSK].get(mode="promise_in_bounds").astype(jnp.int32)
    alive_BS = (common_BS >= match_B[:, None]) & (i_BS == wanted_BS)  # clipped: a duplicate
    drafts = []
    for j in range(n_draft):
        next_BS = next_BSK[:, :, j]
        count_BS = jnp.sum((next_BS[:, :, None] == next_BS[:, None, :]) & alive_BS[:, None, :], axis=2)
        score_BS = jnp.log(count_BS.astype(jnp.float32))
        if perturb_BKV is not None:
            score_BS += jnp.take_along_axis(perturb_BKV[:, j], next_BS, axis=1)
        best_B = jnp.argmax(jnp.where(alive_BS, score_BS, -jnp.inf), axis=1)
        drafts.append(jnp.take_along_axis(next_BS, best_B[:, None], axis=1)[:, 0])
        alive_BS &= next_BS == drafts[-1][:, None]  # the occurrences that go on as drafted
    return jnp.stack(drafts, axis=1), match_B


def lookup_window(window_BL, length, n_draft: int, max_match: int = 16):
    """The prompt-lookup part of `draft`: (drafts_BK, match_B), match_B the length of the longest
    (at most max_match) match of the context's suffix that ends at an earlier position e < length - 1
    (the most recent of the longest), drafts_BK the tokens from e + 1 on: window[e + 1 + i % (length - 1
    - e)], the copy repeating with the match's period past the context's end."""
    length = jnp.asarray(length, jnp.int32)
    q_BM, n_valid = _reversed_context(window_BL, length, max_match)
    B, L = window_BL.shape
    M = max_match
    e_L = jnp.arange(L)
    # Match length at each end position e: offsets j = 0, 1, ... while window[e - j] == q[j], as a
    # running "all equal so far" over the max_match offsets (a static loop: each step compares every
    # position of every row, and XLA fuses the steps into one pass; 3-4x quicker on XLA:CPU than a
    # (B, max_match, L) comparison reduced over offsets).
    padded_BL = jnp.pad(window_BL.astype(jnp.int32), ((0, 0), (M, 0)), constant_values=-1)
    equal_so_far_BL = jnp.broadcast_to(e_L < length - 1, (B, L))  # e < length - 1: an earlier match
    matched_BL = jnp.zeros((B, L), jnp.int32)
    for j in range(M):
        earlier_BL = padded_BL[:, M - j : M - j + L]  # window[:, e - j], -1 before position 0
        equal_so_far_BL &= (earlier_BL == q_BM[:, j, None]) & (j < n_valid)
        matched_BL += equal_so_far_BL
    # The longest, the most recent of those: one max over (match, e) packed in an int32, no argmax.
    best_B = jnp.max(matched_BL * L + e_L, axis=1)
    match_B, best_e_B = best_B // L, best_B % L
    # Copy from e + 1 on; past length - 1 the copy reads its own drafts: period length - 1 - e.
    period_B = jnp.maximum(length - 1 - best_e_B, 1)
    idx_BK = best_e_B[:, None] + 1 + jnp.arange(n_draft) % period_B[:, None]
    return jnp.take_along_axis(window_BL, jnp.clip(idx_BK, 0, L - 1), axis=1).astype(jnp.int32), match_B


def draft(index, window_BL, length, n_draft: int, max_match: int = 16, perturb_BKV=None):
    """Propose the n_draft tokens after each row's context window_BL[:, :length] (length >= 1, a traced
    int32 scalar or an int; positions from `length` on are ignored). Pure jnp: jit with n_draft and
    max_match static.

    index: build_index's arrays (on the device), or None to look in the context alone (a run without an
    index; with no match there, the drafts repeat the last token). perturb_BKV (float, V >= every token
    id): added to the log-counts of the text's candidates (lookup_text), e.g. the Gumbel noise of the
    draws that will check the drafts, times the temperature; None: no perturbation.
    Returns (drafts_BK int32, match_B int32), match_B the length of the longest suffix match used
    (0..min(length, max_match); 0: none)."""
    own_BK, own_match_B = lookup_window(window_BL, length, n_draft, max_match)
    if index is None:
        last_B1 = lax.dynamic_slice_in_dim(window_BL, jnp.asarray(length, jnp.int32) - 1, 1, axis=1)
        return jnp.where(own_match_B[:, None] > 0, own_BK, last_B1.astype(jnp.int32)), own_match_B
    text_BK, text_match_B = lookup_text(index, window_BL, length, n_draft, max_match, perturb_BKV)
    use_text_B = text_match_B >= own_match_B
    drafts_BK = jnp.where(use_text_B[:, None], text_BK, own_BK)
    match_B = jnp.maximum(text_match_B, own_match_B)
    drafts_BK = jnp.where(match_B[:, None] > 0, drafts_BK, jnp.asarray(index["most_frequent"], jnp.int32))
    return drafts_BK, match_B


def save_index(path: str, index: dict) -> None:
    """Write build_index's arrays to `path` (np.savez, atomically: a reader never sees half a file)."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **index)


def load_index(path: str) -> dict[str, np.ndarray]:
    """save_index's arrays; ValueError if the file is not such an index (OSError if it cannot be read)."""
    with np.load(path) as saved:
        if sorted(saved.files) != sorted(INDEX_ARRAYS):
            raise ValueError(f"{path} is not a draft index (arrays {sorted(saved.files)})")
        index = {name: saved[name] for name in INDEX_ARRAYS}
    if index["text"].ndim != 1 or index["suffix_array"].shape != index["text"].shape:
        raise ValueError(f"{path} is not a draft index (shapes do not match)")
    return index
