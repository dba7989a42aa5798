"""What this CPU does fast, in words a benchmark line or a warning can print.

CPUs of one cloud machine type differ: some have AVX-512 with native bfloat16 (AVX512-BF16 dot
products, AMX tiles), others AVX2 only. Without native bfloat16, bfloat16 arithmetic is emulated
(widened to float32 and rounded back around every operation): under bf16 autocast a dense
training step at T = 8192 took 79 s on an AVX2-only EPYC against 9 s in float32. So nothing here
assumes bfloat16 is fast; it reads what the CPU says.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

# /proc/cpuinfo flags that make bfloat16 arithmetic native: x86 (AVX512-BF16, AMX-BF16) and
# aarch64 (FEAT_BF16, listed as "bf16" under Features).
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# The compiler macros of the instruction sets the fused kernels use (fused_cpu/vector_ops.h), in
# the order a reader expects them.
KERNEL_EXTENSIONS = {"__AVX2__": "AVX2", "__FMA__": "FMA", "__AVX512F__": "AVX512F", "__AVX512BW__": "AVX512BW",
                     "__AVX512VL__": "AVX512VL", "__AVX512BF16__": "AVX512-BF16", "__ARM_NEON": "NEON"}


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor"), else what `platform` knows."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on ARM);
    None where they cannot be read."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def native_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """True if the CPU computes bfloat16 natively, False if its flags say it does not, None if
    the flags cannot be read (then nothing is claimed either way)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    return any(flag in flags for flag in NATIVE_BFLOAT16_FLAGS)


def compiled_extensions(flags: list[str]) -> list[str] | None:
    """The instruction sets a C++ build with `flags` targets, read from the compiler's own
    predefined macros (the fused kernels build with `-march=native`); None without a compiler."""
    compiler = os.environ.get("CXX", "c++")
    try:
        macros = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                                text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return [name for macro, name in KERNEL_EXTENSIONS.items() if macro in defined]


def bfloat16_emulation_warning(cpuinfo: str | None = None) -> str | None:
    """One line for a user who asked for bfloat16 on the CPU when it has no native bfloat16, else
    None (native, or unknown)."""
    if native_bfloat16(cpuinfo) is not False:
        return None
    wanted = "/".join(NATIVE_BFLOAT16_FLAGS)
    return (f"warning: bfloat16 on a CPU without native bfloat16 ({cpu_model(cpuinfo)}: none of {wanted} in "
            "its flags): bfloat16 is emulated here and can be several times slower than float32")


def describe_cpu() -> str:
    """One line for a benchmark's header: the CPU, torch's vector kernels, native bfloat16, and
    what the fused kernels were built for (or why they are not used)."""
    import torch

    from sparse_viz.model import fused_kernels

    native = native_bfloat16()
    bfloat16 = {True: "yes", False: "no (emulated)", None: "unknown"}[native]
    if fused_kernels.fused_kernels_available(torch.zeros(1)):
        extensions = compiled_extensions(fused_kernels.BUILD_FLAGS)
        kernels = "built for " + (" ".join(extensions) if extensions else "this CPU's baseline") \
            if extensions is not None else "built (flags unknown: no compiler to ask)"
    else:
        kernels = "not used (" + (fused_kernels.unavailable_reason() or "unknown reason") + ")"
    return (f"CPU: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores); torch {torch.__version__} "
            f"vector kernels: {torch.backends.cpu.get_cpu_capability()}; native bfloat16: {bfloat16}; "
            f"fused kernels: {kernels}")
