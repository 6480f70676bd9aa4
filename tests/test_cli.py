"""train.py and sample.py end to end, in subprocesses, as a user runs them (8 simulated devices)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from script_runner import assert_one_line_error, run

pytestmark = pytest.mark.slow  # every test here starts a process (see pyproject.toml)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(REPO, "configs", "tiny.py")]


@pytest.fixture(scope="module")
def trained(small_text_path, tmp_path_factory):
    """A tiny run of 20 steps (checkpoints at 10 and 20)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path)
    assert result.returncode == 0, result.stderr
    return workdir, result


def test_train_writes_checkpoints_metrics_config_and_tokenizer(trained):
    workdir, result = trained
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all({"step", "train_loss", "val_loss"} <= r.keys() for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert json.load(open(os.path.join(workdir, "config.json")))["vocab_size"] == len(
        json.load(open(os.path.join(workdir, "tokenizer.json")))["chars"]
    )
    assert "step 20: train loss" in result.stdout and "8 cpu device(s)" in result.stdout


def test_train_writes_tensorboard_events_and_a_loss_plot(trained, read_events):
    workdir, _ = trained
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    scalars, texts = read_events(workdir)
    for key, tag in [
        ("loss", "train/loss"),
        ("lr", "train/lr"),
        ("tokens_per_s", "perf/tokens_per_s"),
        ("train_loss", "eval/train_loss"),
        ("val_loss", "eval/val_loss"),
    ]:
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        np.testing.assert_allclose(
            [v for _, v in scalars[tag]], [v for _, v in expected], rtol=1e-6
        )  # float32
    assert [step for step, _ in scalars["eval/val_loss"]] == [0, 10, 20]
    assert "perf/mfu" not in scalars  # a CPU has no known peak: no MFU anywhere
    samples = texts["eval/sample/text_summary"]
    assert [step for step, _ in samples] == [0, 10, 20]
    assert all(
        text.startswith("```\n") and text.endswith("\n```") and len(text) == 200 + 8 for _, text in samples
    )
    with open(os.path.join(workdir, "losses.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_sample_of_an_evaluation_is_what_sample_py_prints(trained, read_events):
    workdir, _ = trained
    step, text = read_events(workdir)[1]["eval/sample/text_summary"][-1]
    sample = text.removeprefix("```\n").removesuffix("\n```")
    assert step == 20 and len(sample) == 200
    result = run("sample.py", "--workdir", workdir, "--max_new_tokens", "200", "--temperature", "0.8")
    assert result.returncode == 0 and result.stdout == "\n" + sample + "\n"


def test_plot_puts_several_runs_in_one_figure(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(
        '{"step": 0, "train_loss": 4.2, "val_loss": 4.2}\n{"step": 10, "train_loss": 3.0, "val_loss": 3.1}\n'
    )
    out = tmp_path / "both.png"
    result = run("plot.py", trained[0], str(other), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run("plot.py", str(tmp_path / "nope"), "--out", str(out)), "no metrics in")
    assert_one_line_error(run("plot.py"), "RUN_DIR")


def test_train_step_is_kept_in_the_compilation_cache(small_text_path, tmp_path):
    """What makes a second run start fast: with XLA's dots the compiled train step is written to disk."""
    result = run(
        "train.py",
        *TINY,
        "--workdir",
        str(tmp_path / "run"),
        "--data",
        small_text_path,
        "--config.cpu_dots=xla",
        "--config.max_iters=1",
        "--config.eval_interval=1",
        "--config.checkpoint_interval=1",
        "--config.log_interval=1",
        env={"ORPHEUS_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": ""},
    )
    assert result.returncode == 0, result.stderr
    assert any(name.startswith("jit_train_steps-") for name in os.listdir(tmp_path / "xla"))


def test_onednn_steps_missing_from_the_cache_is_not_warned_about(trained):
    """jaxlib cannot serialize oneDNN steps (cpu_dots's default on CPU); that is expected, not news."""
    assert "Error writing persistent compilation cache" not in trained[1].stderr


def test_second_run_resumes_and_continues(trained, small_text_path, tmp_path, read_events):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30")
    assert result.returncode == 0, result.stderr
    assert "resuming from step 20" in result.stdout and "step 30: train loss" in result.stdout
    assert "30" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert [step for step, _ in read_events(workdir)[0]["eval/val_loss"]] == [0, 10, 20, 30]
    again = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30")
    assert again.returncode == 0 and "Already trained to step 30" in again.stdout


def test_sigint_saves_a_checkpoint_and_exits_cleanly(small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        *TINY,
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.max_iters=1000000",
        "--config.checkpoint_interval=1000000",
        "--config.eval_interval=1000000",
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 0:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    stopped = [line for line in out.splitlines() if line.startswith("Stopped by SIGINT at step")]
    assert stopped and "Run the same command again to resume" in stopped[0]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
    resumed = run("train.py", *args[:-3], f"--config.max_iters={step + 10}")
    assert resumed.returncode == 0 and f"resuming from step {step}" in resumed.stdout


def test_missing_data_file(tmp_path):
    assert_one_line_error(
        run("train.py", *TINY, "--workdir", str(tmp_path), "--data", str(tmp_path / "no.txt")), "not found"
    )


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(
        run("train.py", *TINY, "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "empty.txt")),
        "empty",
    )


def test_text_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("Sing, O goddess.\n")
    assert_one_line_error(
        run("train.py", *TINY, "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "short.txt")),
        "too short",
        "block_size",
    )


def test_batch_not_divisible_by_devices(small_text_path, tmp_path):
    assert_one_line_error(
        run(
            "train.py", *TINY, "--workdir", str(tmp_path), "--data", small_text_path, "--config.batch_size=12"
        ),
        "divisible by the number of devices (8)",
    )


def test_workdir_of_another_model(trained, small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert_one_line_error(
        run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.n_embd=64"),
        "different model",
        "n_embd 32 vs 64",
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing lost


def test_corrupt_checkpoint(trained, small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "20", "state")):
        for name in files:
            if os.path.basename(root) == "d":  # the array data
                open(os.path.join(root, name), "wb").close()
    assert_one_line_error(
        run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30"),
        "cannot restore checkpoint",
    )


def test_resume_on_text_with_new_characters(trained, tmp_path, small_text_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    (tmp_path / "other.txt").write_text(open(small_text_path).read() + "\u00e9\u00e8\n")
    assert_one_line_error(
        run(
            "train.py",
            *TINY,
            "--workdir",
            workdir,
            "--data",
            str(tmp_path / "other.txt"),
            "--config.max_iters=30",
        ),
        "not in the vocabulary",
        "'\u00e8', '\u00e9'",
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config.n_head=3"], "n_embd (32) must be divisible by n_head (3)"),
        (["--config.batch_size=0"], "batch_size must be a positive integer"),
        (["--config.no_such_key=1"], "unknown config key: no_such_key"),
        (["--config.batch_size=many"], "--config.batch_size"),
        (["--config", "configs/no_such_config.py"], "cannot load the config"),
        (["--no_such_flag"], "no_such_flag"),
    ],
)
def test_bad_flags_and_config_values(args, words, tmp_path):
    config = [] if "--config" in args else TINY
    assert_one_line_error(run("train.py", *config, *args, "--workdir", str(tmp_path)), words)


def test_help_lists_the_flags_and_the_configs_keys_without_starting_a_backend():
    """--help (absl's flags alone would call it an unknown flag) exits 0 with the usage, the flags and
    every config key at the config's value, overrides applied; JAX_PLATFORMS=tpu fails any backend."""
    from orpheus_jax.config import REQUIRED_KEYS

    for args, name, n_layer in (
        (["--help"], "iliad_char", 6),
        (["--config", "tiny", "--config.n_layer=3", "-h"], "tiny", 3),
    ):
        result = run("train.py", *args, env={"JAX_PLATFORMS": "tpu"})
        assert result.returncode == 0 and not result.stderr, result.stderr
        out = result.stdout
        assert "orpheus-train --config tiny" in out and "--workdir: Run directory" in out
        assert f"as {name} sets them" in out and f"  n_layer = {n_layer}\n" in out
        assert all(f"  {key} = " in out for key in REQUIRED_KEYS)


def test_offline_with_nothing_cached_says_to_pass_data(tmp_path):
    env = {
        "ORPHEUS_DATA": "",
        "ORPHEUS_CACHE": str(tmp_path / "cache"),
        "ORPHEUS_DATA_URL": "http://127.0.0.1:9/pg2199.txt",
    }
    result = run("train.py", *TINY, "--workdir", str(tmp_path / "w"), env=env)
    assert "Downloading the Iliad" in result.stdout
    assert_one_line_error(result, "cannot download", "--data FILE")


# --- sample.py ---------------------------------------------------------------------------------


def test_sample_prints_prompt_and_continuation(trained):
    result = run("sample.py", "--workdir", trained[0], "--prompt", "Achilles", "--max_new_tokens", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Achilles") and len(result.stdout) == len("Achilles") + 40 + 1


def test_sample_is_reproducible_and_separates_samples(trained):
    args = ["--workdir", trained[0], "--prompt", "Sing", "--max_new_tokens", "30", "--num_samples", "3"]
    a, b = run("sample.py", *args), run("sample.py", *args)
    assert a.returncode == 0 and a.stdout == b.stdout
    samples = a.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("Sing") and len(s) == 34 for s in samples)
    assert run("sample.py", *args, "--seed", "1").stdout != a.stdout
    # Streaming decodes one sample at a time with its own key: the same texts.
    assert run("sample.py", *args, "--stream").stdout == a.stdout


def test_sample_empty_prompt_starts_from_a_newline_and_stop_ends_it(trained):
    result = run("sample.py", "--workdir", trained[0], "--max_new_tokens", "300", "--stop", " ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("\n") and result.stdout.endswith(" \n") and result.stdout.count(" ") == 1


def test_a_second_sample_loads_the_kept_sampler_without_flax_or_orbax(trained, tmp_path, weights="bfloat16"):
    """The second run with the same settings takes its compiled programs and parameters from the user
    cache (sampler_cache.kept_sampler): it imports neither Flax nor Orbax, and prints the same text."""
    args = ["--workdir", trained[0], "--prompt", "Sing", "--max_new_tokens", "40", "--weights", weights]
    env = {**os.environ, "ORPHEUS_CACHE": str(tmp_path)}
    first = run("sample.py", *args, env=env)
    second = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "sample.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert first.returncode == 0 and second.returncode == 0 and second.stdout == first.stdout
    imported = {
        line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")
    }
    assert "jax" in imported and not {"flax", "orbax.checkpoint", "optax"} & imported


def test_sample_from_an_earlier_step(trained):
    a = run(
        "sample.py", "--workdir", trained[0], "--step", "10", "--max_new_tokens", "20", "--temperature", "0"
    )
    b = run(
        "sample.py", "--workdir", trained[0], "--step", "20", "--max_new_tokens", "20", "--temperature", "0"
    )
    assert a.returncode == 0 and b.returncode == 0 and a.stdout != b.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prompt", "Sing\u00e9\u00e8"], "2 character(s) not in the vocabulary: '\u00e8', '\u00e9'"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be positive"),
        (["--shift", "0"], "--shift must be in [1, 31]"),
        (["--step", "7"], "no checkpoint at step 7"),
    ],
)
def test_sample_bad_inputs(trained, args, words):
    assert_one_line_error(run("sample.py", "--workdir", trained[0], *args), *words.split("|"))


def test_sample_without_workdir_or_checkpoint(tmp_path):
    assert_one_line_error(run("sample.py", "--workdir", str(tmp_path / "nope")), "no such workdir")
    assert_one_line_error(run("sample.py", "--workdir", str(tmp_path)), "no checkpoints in")
    assert_one_line_error(run("sample.py"), "--workdir")


def test_stop_decodes_escapes(trained):
    """--stop '\\n' as a shell passes it (a backslash and an n) stops at the first newline."""
    result = run(
        "sample.py", "--workdir", trained[0], "--prompt", "Sing", "--max_new_tokens", "300", "--stop", "\\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n\n") and result.stdout.count("\n") == 2
    assert_one_line_error(
        run("sample.py", "--workdir", trained[0], "--stop", "a\\"), "--stop has a bad escape"
    )


def test_stop_text_may_begin_in_the_prompt(trained):
    args = ["--workdir", trained[0], "--prompt", "Achilles", "--max_new_tokens", "30", "--temperature", "0"]
    free = run("sample.py", *args).stdout[len("Achilles") : -1]
    stop = "es" + free[:2]  # the prompt's last two characters and the first two generated
    result = run("sample.py", *args, "--stop", stop)
    assert result.returncode == 0 and result.stdout == "Achilles" + free[:2] + "\n"


def test_ctrl_c_during_an_evaluation_saves_the_step(trained, small_text_path, tmp_path):
    """A stop cuts a long evaluation short and saves the step it was at; a second Ctrl-C changes nothing."""
    workdir = str(tmp_path / "run")
    args = [
        *TINY,
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.max_iters=1000000",
        "--config.eval_interval=20",
        "--config.eval_iters=100000",
        "--config.checkpoint_interval=1000000",
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for line in proc.stdout:  # the first evaluation (step 0) is long too: cut it short as well
            if line.startswith("Compiled"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "step 0: evaluation cut short by SIGINT" in out, err
    assert "nothing new to save" in out and not os.listdir(os.path.join(workdir, "checkpoints"))

    # Now a long evaluation at step 40 of a run resumed from step 20 (resumed runs skip the step-0 one).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(trained[0], resumed)
    args[args.index(workdir)] = workdir = resumed
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *args, "--config.log_interval=20"],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    try:
        deadline = time.time() + 120
        while not (os.path.exists(metrics) and '"step": 40, "loss"' in open(metrics).read()):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the long evaluation of step 40
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "step 40: evaluation cut short by SIGINT" in out
    assert "Stopped by SIGINT at step 40; checkpoint saved" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "40"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--distributed"], "cannot join the multi-process run|elsewhere pass --coordinator_address"),
        (
            ["--coordinator_address", "localhost:1", "--num_processes", "2", "--process_id", "2"],
            "process_id < num_processes",
        ),
        (["--num_processes", "two"], "--num_processes"),
    ],
)
def test_bad_multi_process_flags(args, words, tmp_path, small_text_path):
    result = run(
        "train.py",
        *TINY,
        "--workdir",
        str(tmp_path),
        "--data",
        small_text_path,
        *args,
        env={"JAX_PLATFORMS": "cpu"},
    )
    assert_one_line_error(result, *words.split("|"))
