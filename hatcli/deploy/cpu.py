"""What this CPU's integer kernels compute exactly, for the compiler's choice of formats."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""x86 flags of the instructions that add u8 x s8 products into 32 bits without saturating."""


def cpu_flags() -> set[str]:
    """The feature flags of this CPU from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def exact_u8s8() -> bool:
    """Whether ONNX Runtime's U8S8 (uint8 activations x int8 weights) kernels are exact here.

    x86 without VNNI multiplies with `vpmaddubsw`, which adds pairs of products in 16 bits and
    can saturate; VNNI (`vpdpbusd`) and Arm's dot-product kernels accumulate in 32 bits.
    """
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return any(flag in flags for flag in VNNI_FLAGS)
    if machine in ("aarch64", "arm64"):
        return "asimddp" in flags
    return False


def cpu_name() -> str:
    """This CPU's model name from /proc/cpuinfo, with the int8 instructions it has that matter to
    int8 kernels (AVX2, AVX-512 VNNI, AVX-VNNI, AMX); `platform.processor()` where there is none."""
    import platform

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    have = [label for flag, label in (("avx2", "AVX2"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                      ("amx_int8", "AMX"), ("asimddp", "Arm dot product")) if flag in flags]
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(have)})" if have else name
