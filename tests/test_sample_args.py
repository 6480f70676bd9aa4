"""sample.py's argument checks, in-process: each bad value is a one-line OrpheusError before any
work (test_cli.py runs the whole command for the checks that need a run)."""

import pytest

from orpheus_jax import OrpheusError
from orpheus_jax.cli.sample import parse_args

RUN = ["--workdir", "runs/any"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be positive, got 0"),
        (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--top_k", "-2"], "--top_k must be >= 0, got -2"),
        (["--num_samples", "0"], "--num_samples must be positive, got 0"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", "4294967296"], "--seed must be in [0, 2**32), got 4294967296"),
        (["--draft_len", "0"], "--draft_len must be positive, got 0"),
        (["--stop", ""], "--stop must not be empty"),
        (["--stop", "\\N"], "--stop has a bad escape"),
        (["--prompt", "a", "--prompt_file", "f"], "not allowed with argument"),
        (["--step", "last"], "a step number or 'best', not 'last'"),
    ],
)
def test_bad_values_are_one_line_errors(args, words):
    with pytest.raises(OrpheusError) as error:
        parse_args(RUN + args)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_seeds_range_ends_are_accepted():
    assert parse_args(RUN + ["--seed", "0"]).seed == 0
    assert parse_args(RUN + ["--seed", str(2**32 - 1)]).seed == 2**32 - 1
