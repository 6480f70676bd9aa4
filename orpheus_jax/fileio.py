"""Writing files so that no reader ever sees half of one, and the wording of OS errors.

Every file the project writes goes through `atomic_file`: it is written under a temporary name of this
process's own (host, pid and a random part), then renamed into place. Two processes writing the same
file (hosts sharing a cache, two `sample.py` at once) each rename a whole file; the last one wins.
"""

import contextlib
import os
import secrets
import socket

from orpheus_jax import WriteError


def os_reason(e: OSError) -> str:
    """The operating system's reason for a failed file operation, in lower case ("no space left on
    device")."""
    return (e.strerror or str(e)).lower()


def temporary_name(path: str) -> str:
    """A name beside `path` that no other process or call uses."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, file_mode: int | None = None):
    """Yield a file to write `path`'s new content into; it replaces `path` when the block ends without an
    error. On an error the temporary file is removed and the error (an OSError for the OS's) propagates.

    file_mode: the new file's permission bits (default: the umask's)."""
    tmp = temporary_name(path)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = os.open(tmp, flags, 0o666 if file_mode is None else file_mode)
        with open(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # only there if something failed


def write_atomically(path: str, content: str | bytes) -> None:
    """Write a run-directory file (config, tokenizer, metrics); WriteError says what and why if it fails."""
    try:
        with atomic_file(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}") from None
