"""Orpheus-JAX: a character-level GPT on Homer's Iliad, in JAX/Flax."""


class OrpheusError(Exception):
    """A user-facing error: the CLIs print its message on one line and exit non-zero."""


class WriteError(OrpheusError):
    """A file of the run directory could not be written (full disk, permissions, read-only)."""


def os_reason(e: OSError) -> str:
    """The operating system's reason for a failed file operation, in lower case ("no space left on device")."""
    return (e.strerror or str(e)).lower()


def write_atomically(path: str, text: str) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    import os

    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}") from None


def deterministic_gpu_ops() -> None:
    """Ask XLA for deterministic GPU kernels; call it before JAX first touches a device. XLA's default GPU
    scatter-adds (the embeddings' gradients) use atomics: on an H100 a resumed run then did not continue
    exactly as the uninterrupted one. A choice already in XLA_FLAGS is kept. CPUs and TPUs are
    deterministic anyway."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
