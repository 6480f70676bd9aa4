"""Sample text from a trained Orpheus-JAX run: orpheus-sample, or python sample.py in a checkout.

    orpheus-sample --workdir runs/iliad_char_cpu --prompt "Achilles" --max_new_tokens 300
    orpheus-sample --workdir runs/iliad_char_cpu --num_samples 4 --temperature 0.8 --top_k 20
    orpheus-sample --workdir runs/iliad_char_cpu --stream --stop '\n\n'    # up to the first blank line
    orpheus-sample --workdir runs/iliad_char_cpu --draft none               # no speculative decoding

Everything (config, vocabulary, weights) comes from the workdir. Samples are separated by a line of dashes.
"""

import sys

from orpheus_jax import OrpheusError
from orpheus_jax.cli import add_step_argument, argument_parser, describe_step, run_main

DASHES = "-" * 40
DRAFT_LEN = 4  # the default --draft_len: the best or near it at batch 1 for every weight type (RESULTS)


def parse_args(argv):
    p = argument_parser(__doc__)
    p.add_argument("--workdir", required=True, help="a run directory written by train.py")
    add_step_argument(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely characters (0: all)")
    p.add_argument(
        "--top_p", type=float, default=1.0, help="nucleus: keep the smallest set holding this probability"
    )
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shift",
        type=int,
        default=None,
        help="when the context is full, drop this many oldest tokens and re-prefill "
        "(1 = the seed's crop-and-recompute, exact; default block_size // 2)",
    )
    p.add_argument(
        "--stop",
        default=None,
        help="end a sample at the first occurrence of this text; escapes such as \\n and \\t are "
        "decoded, so --stop '\\n\\n' stops at a blank line",
    )
    p.add_argument("--stream", action="store_true", help="print characters as they are produced")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the run's)"
    )
    p.add_argument(
        "--draft",
        choices=("none", "ngram"),
        default=None,
        help="speculative decoding, the same text faster: 'ngram' drafts the next characters from the "
        "training text (the run's drafts.npz) and from the prompt and text so far, and the model checks "
        "them in one pass; 'none' decodes one character a step (default: ngram for one sample at a "
        "time of a seed-sized or larger model, else none: drafting costs more than it saves for small "
        "models, and rows of a batch wait for each other)",
    )
    p.add_argument(
        "--draft_len",
        type=int,
        default=DRAFT_LEN,
        help="characters drafted and checked per pass (default %(default)s)",
    )
    p.add_argument(
        "--weights",
        choices=("float32", "bfloat16", "int8"),
        default="float32",
        help="the matrices' type for decoding: bfloat16 halves, int8 (a scale per output, the "
        "activations quantized per row) quarters the bytes read per character",
    )

    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise OrpheusError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise OrpheusError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise OrpheusError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise OrpheusError(f"--top_k must be >= 0, got {args.top_k}")
    if args.num_samples <= 0:
        raise OrpheusError(f"--num_samples must be positive, got {args.num_samples}")
    if not 0 <= args.seed < 2**32:
        raise OrpheusError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.draft_len < 1:
        raise OrpheusError(f"--draft_len must be positive, got {args.draft_len}")
    if args.stop is not None:
        args.stop = decode_escapes(args.stop)
        if not args.stop:
            raise OrpheusError("--stop must not be empty")
    return args


def decode_escapes(text: str) -> str:
    """Python's string escapes (\\n, \\t, \\\\, \\x41, \\u00e9) as a shell passes them: a backslash and
    a letter."""
    try:  # backslashreplace keeps characters beyond Latin-1 through the unicode_escape round trip
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise OrpheusError(f"--stop has a bad escape: {e.reason}") from None


def find_stop(prompt: str, text: str, stop: str, searched: int) -> int:
    """Where the sample `text` ends if `stop` occurs in prompt + text ending past the prompt (a stop
    text may begin in the prompt), else -1. `searched`: length of text already searched."""
    full = prompt + text
    at = full.find(stop, max(0, len(prompt) + searched - len(stop) + 1))
    return -1 if at < 0 else at + len(stop) - len(prompt)


def run_draft_index(workdir: str, vocab_size: int):
    """The run's draft index (drafts.npz, written by train.py), or None, with a note on stderr, when the
    run has none (runs older than it, imported weights) or it is unusable: drafts then come from the
    prompt and the text so far alone."""
    import zipfile

    from orpheus_jax import rundir
    from orpheus_jax.drafts import load_index

    path = rundir.drafts_path(workdir)
    try:
        index = load_index(path)
        if int(index["text"].max()) >= vocab_size:
            raise ValueError("its characters are not this run's")
        return index
    except FileNotFoundError:
        why = "has no draft index (a run trained before train.py wrote one, or imported weights)"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        why = f"has an unusable draft index ({e})"
    print(f"note: {workdir} {why}: drafting from the prompt and the text so far only", file=sys.stderr)
    return None


def run_command(argv: list[str]) -> None:
    """The command on its arguments; errors for the user are OrpheusError."""
    args = parse_args(argv)
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise OrpheusError(f"cannot read --prompt_file: {e}") from None

    # After argument checks: bad flags answer at once. Neither Flax nor Orbax is imported unless the
    # sampler must be built (a first run with these settings): see sampler_cache.kept_sampler.
    from orpheus_jax import config as config_lib
    from orpheus_jax import rundir
    from orpheus_jax.sampler import drafting_pays, max_draft_len
    from orpheus_jax.sampler_cache import kept_sampler
    from orpheus_jax.tokenizer import CharTokenizer
    from orpheus_jax.user_cache import enable_compilation_cache

    enable_compilation_cache()
    step = rundir.find_step(args.workdir, args.step)
    if args.step == "best":
        print(describe_step(args.workdir, step, args.step), file=sys.stderr, flush=True)
    cfg = config_lib.load(rundir.config_path(args.workdir))
    tokenizer = CharTokenizer.load(rundir.tokenizer_path(args.workdir))
    prompt = args.prompt or "\n"
    prompt_ids = tokenizer.encode(prompt)  # unknown characters: a one-line error naming them
    if args.shift is not None and not 1 <= args.shift < cfg.block_size:
        raise OrpheusError(f"--shift must be in [1, {cfg.block_size - 1}] (block_size - 1), got {args.shift}")

    # Streaming shows one sample at a time (batch 1, the row's own key: the same text as batched).
    batches = [[r] for r in range(args.num_samples)] if args.stream else [list(range(args.num_samples))]
    draft = args.draft or ("ngram" if drafting_pays(cfg.n_layer, cfg.n_embd, len(batches[0])) else "none")
    draft_len = args.draft_len if draft == "ngram" else 0
    most = max_draft_len(cfg.block_size, cfg.get("kv_block", 64))  # model.GPTConfig's default kv_block
    if draft_len > most:
        raise OrpheusError(f"--draft_len must be at most {most} for this model, got {draft_len}")
    sampler = kept_sampler(
        args.workdir,
        step,
        batch_size=len(batches[0]),
        shift=args.shift,
        weights=args.weights,
        dtype=args.dtype,
        draft_len=draft_len,
        draft_index=run_draft_index(args.workdir, tokenizer.vocab_size) if draft_len else None,
    )
    out = sys.stdout
    for b, rows in enumerate(batches):
        texts = ["" for _ in rows]
        done = [False for _ in rows]
        if args.stream:
            out.write(prompt)
        for tokens_Bn in sampler.generate(
            prompt_ids, args.max_new_tokens, args.seed, rows, args.temperature, args.top_k, args.top_p
        ):
            for i, ids in enumerate(tokens_Bn):
                if done[i]:
                    continue
                before = len(texts[i])
                texts[i] += tokenizer.decode(ids)
                if args.stop:
                    end = find_stop(prompt, texts[i], args.stop, before)
                    if end >= 0:
                        texts[i], done[i] = texts[i][:end], True
                if args.stream:
                    out.write(texts[i][before:])
                    out.flush()
            if all(done):
                break
        if args.stream:
            out.write("\n" + (DASHES + "\n" if b < len(batches) - 1 else ""))
        else:
            out.write(("\n" + DASHES + "\n").join(prompt + t for t in texts) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> None:
    """orpheus-sample and sample.py: run_command(argv) (default: sys.argv[1:]) under run_main."""
    run_main(run_command, argv)


if __name__ == "__main__":
    main()
