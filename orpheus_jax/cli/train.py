"""Train Orpheus-JAX on the Iliad (or your own text): orpheus-train, or python train.py in a checkout.

    orpheus-train                                   # seed recipe on an accelerator, CPU preset otherwise
    orpheus-train --config tiny --workdir runs/tiny --config.max_iters=100
    orpheus-train --config my_config.py --data my_text.txt --config.batch_size=32

--config is a shipped config's name (iliad_char, iliad_char_cpu, orpheus_seed, tiny) or a config file
(configs/NAME.py in a checkout is the shipped one). Re-running with the same --workdir resumes from its
latest checkpoint; Ctrl-C saves one and exits.

Several hosts: the same command on every host, plus --distributed (TPU pod slices, SLURM: JAX finds the
others) or --coordinator_address HOST:PORT --num_processes N --process_id I (see the README).
"""

import os
import sys
import textwrap
import time

import jax
from absl import flags
from ml_collections import config_flags

from orpheus_jax import OrpheusError, configs, data, distributed, host_memory
from orpheus_jax import config as config_lib
from orpheus_jax.cli import seconds_since_launch
from orpheus_jax.train import train
from orpheus_jax.user_cache import enable_compilation_cache

SEED_CONFIG = configs.path(configs.SEED)
CPU_CONFIG = configs.path(configs.CPU)


def config_given(argv) -> bool:
    return any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:])


def default_config_path() -> str:
    # Decided before flag parsing, so --config.KEY=VALUE overrides apply to the default too.
    if config_given(sys.argv):
        return SEED_CONFIG  # replaced by the flag anyway
    return SEED_CONFIG if jax.default_backend() != "cpu" else CPU_CONFIG


def resolve_config_names(argv: list[str]) -> list[str]:
    """argv with the value of --config NAME / --config=NAME (a shipped config) made its file's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + configs.resolve(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = configs.resolve(out[i + 1])
    return out


flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
flags.DEFINE_string("data", None, "Training text (default: $ORPHEUS_DATA, else the Iliad, downloaded once).")
# A multi-process run (one process per host), with jax.distributed's own names.
flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run that JAX detects (TPU pod slice, SLURM, Open MPI)."
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, which every process can reach.")
flags.DEFINE_integer("num_processes", None, "Processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's number, 0 .. num_processes - 1.")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "Seconds of silence after which a process counts as dead and the run ends.",
)
FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")  # absl.app defines these; we parse alone


def join_run() -> None:
    """Join a multi-process run, if asked, before anything touches a device (choosing the default
    config does)."""
    try:
        FLAGS(sys.argv, known_only=True)
    except flags.Error as e:
        raise OrpheusError(str(e).splitlines()[0]) from None
    distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        auto=FLAGS.distributed,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
    )


def load_config(default_path: str | None):
    """The --config flag (default: default_path) and absl's flags parsed from sys.argv: the config with
    its --config.KEY=VALUE overrides, or OrpheusError."""
    config_flags.DEFINE_config_file(
        "config",
        default_path,
        f"A shipped config ({', '.join(configs.names())}) or a config file; default: {configs.SEED} "
        f"where JAX finds a GPU or TPU, else {configs.CPU}.",
        lock_config=True,
    )
    try:
        FLAGS(sys.argv)
        cfg = FLAGS.config
        cfg.keys()  # a config file that failed to load raises only when first used
    except flags.Error as e:
        raise OrpheusError(str(e).splitlines()[0]) from None
    except AttributeError as e:  # --config.KEY=VALUE with a KEY the config doesn't have
        raise OrpheusError(f"unknown config key: {str(e).strip(chr(34) + chr(39))}") from None
    except Exception as e:  # the config file: missing, or raising when executed
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise OrpheusError(f"cannot load the config: {' '.join(lines[-2:])}") from None
    return cfg


def config_name(config_file: str) -> str:
    """A config file's name as --config takes it (and as the default workdir, runs/NAME, uses it)."""
    return os.path.splitext(os.path.basename(config_file))[0]


def print_help() -> None:
    """--help: the usage, this command's flags, and every key --config.KEY=VALUE sets, with its value in
    the config given (default: the seed recipe; deciding the device's default would start a backend)."""
    sys.argv = [arg for arg in sys.argv if arg not in HELP_FLAGS]
    if not config_given(sys.argv):
        sys.argv.append(f"--config={SEED_CONFIG}")
    cfg = load_config(None)  # absl would print a default path: the rule is in the flag's text
    name = config_name(config_flags.get_config_filename(FLAGS["config"]))
    print(__doc__.strip() + "\n")
    print("Flags:")
    for flag in sorted(FLAGS.get_flags_for_module(__name__), key=lambda f: f.name):
        default = "" if flag.default in (None, False) else f" (default: {flag.default})"
        print(
            textwrap.fill(
                f"--{flag.name}: {flag.help}{default}", 100, initial_indent="  ", subsequent_indent="      "
            )
        )
    print()
    print(f"Config keys (--config.KEY=VALUE; docs/training.md explains each), as {name} sets them:")
    for key, value in cfg.items():
        print(f"  {key} = {value!r}")


def run_command() -> None:
    """The command: flags from sys.argv; errors for the user are OrpheusError."""
    launched_at = time.perf_counter() - seconds_since_launch()
    host_memory.keep_freed_memory()  # before the first compiled call allocates
    sys.argv[1:] = resolve_config_names(sys.argv[1:])  # ml_collections loads the config by path
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print_help()
        return
    join_run()
    if not distributed.is_main():  # one voice per run: process 0's (errors still reach stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    cfg = load_config(default_config_path())
    config_lib.validate(cfg)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    name = config_name(config_file)
    if not config_given(sys.argv):
        if os.path.abspath(config_file) == CPU_CONFIG:
            print(
                f"No accelerator found: training the CPU preset (--config {configs.CPU}). "
                f"On a GPU/TPU the default is the seed recipe (--config {configs.SEED}).",
                flush=True,
            )
    workdir = FLAGS.workdir or os.path.join("runs", name)
    enable_compilation_cache()
    train(cfg, workdir, data.resolve_corpus(FLAGS.data), launched_at=launched_at)
    distributed.shutdown()  # leaves with the other processes, so none is cut off


def main() -> None:
    """orpheus-train and train.py: run_command(), with errors as one line `error: ...` and exit status 1."""
    try:
        run_command()
    except OrpheusError as e:
        print(f"error: {e}", file=sys.__stderr__, flush=True)
        # No work is pending on this path; skip interpreter teardown, where Orbax/tensorstore
        # threads of a failed restore print tracebacks into a closed event loop.
        os._exit(1)
    except KeyboardInterrupt:
        print("Interrupted before training started: nothing to save.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
