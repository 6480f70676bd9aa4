"""host_memory: a large freed block is reused instead of faulted in anew each time."""

import json
import os
import platform
import subprocess
import sys

import pytest

from orpheus_jax import host_memory

# A 48 MB block (above glibc's largest default mmap threshold, 32 MB) malloc'ed, written and freed ten
# times, as a compiled XLA:CPU call does with its scratch buffer; the page faults, from getrusage.
FAULTS_OF_TEN_BLOCKS = """
import ctypes, json, resource, sys
from orpheus_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = libc.malloc(48 << 20)
    ctypes.memset(block, 1, 48 << 20)
    libc.free(block)
print(json.dumps(dict(kept=kept, faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)))
"""
PAGES_OF_A_BLOCK = (48 << 20) // 4096


def faults_of_ten_blocks(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_TEN_BLOCKS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_large_freed_block_is_reused_not_faulted_in_again(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    default, kept = faults_of_ten_blocks("default"), faults_of_ten_blocks("keep")
    assert kept["kept"]
    assert default["faults"] >= 9 * PAGES_OF_A_BLOCK  # mapped anew and faulted in every time
    assert kept["faults"] <= 1.2 * PAGES_OF_A_BLOCK  # faulted in once, then reused


@pytest.mark.parametrize(
    "name, value",
    [("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536"), ("MALLOC_ARENA_MAX_", "2")],
)
def test_the_users_own_malloc_settings_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert host_memory.user_tunes_malloc()
    assert not host_memory.keep_freed_memory()


def test_other_tunables_do_not_count_as_malloc_settings(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert not host_memory.user_tunes_malloc()
