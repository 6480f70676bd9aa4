"""benchmarks/_common.py: what each figure records about the machine it was measured on."""

import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import _common  # noqa: E402

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu vme avx512f

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
CPU implementer\t: 0x41
"""


def test_the_processor_model_is_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_CPUINFO)
    assert _common.processor_model(str(path)) == "Intel(R) Xeon(R) Processor @ 2.80GHz"


def test_without_a_model_name_the_architecture_is_named(tmp_path):
    fallback = platform.machine()
    path = tmp_path / "cpuinfo"
    path.write_text(ARM_CPUINFO)
    assert _common.processor_model(str(path)) == fallback
    assert _common.processor_model(str(tmp_path / "missing")) == fallback


def test_machine_info_names_the_processor_and_the_device():
    info = _common.machine_info()
    assert info["processor"] and info["device_kind"]
    assert info["cpus"] == os.cpu_count() and info["backend"] in ("cpu", "gpu", "tpu")
