"""bfloat16 is never assumed fast: what the CPU says decides, and a user who asks for bfloat16 on a
CPU that emulates it is told so (training and analysis alike)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_viz.model import cpu_features
from sparse_viz.train import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "train" / "tiny.yaml")

# /proc/cpuinfo excerpts, as those machines print them (flags shortened to the telling ones).
SAPPHIRE_RAPIDS = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile\n")
EPYC_AVX2 = ("processor\t: 0\nmodel name\t: AMD EPYC 7B12\n"
             "flags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n")
AVX512_WITHOUT_BF16 = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                       "flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_vbmi2\n")
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n"


@pytest.mark.parametrize("cpuinfo, native", [
    (SAPPHIRE_RAPIDS, True), (EPYC_AVX2, False), (AVX512_WITHOUT_BF16, False), (GRAVITON3, True), ("", None),
], ids=["sapphire-rapids", "epyc-avx2", "avx512-without-bf16", "graviton3", "no-cpuinfo"])
def test_native_bfloat16_is_read_from_the_cpus_flags(cpuinfo, native):
    assert cpu_features.native_bfloat16(cpuinfo) is native


def test_the_warning_names_the_cpu_and_what_it_lacks():
    line = cpu_features.bfloat16_emulation_warning(EPYC_AVX2)
    assert line is not None and "\n" not in line
    assert "AMD EPYC 7B12" in line and "avx512_bf16" in line and "emulated" in line
    assert cpu_features.bfloat16_emulation_warning(SAPPHIRE_RAPIDS) is None
    assert cpu_features.bfloat16_emulation_warning("") is None  # unknown: nothing claimed


def test_the_kernels_build_flags_are_read_from_the_compiler():
    """-mno-avx512f leaves AVX2 in and takes every AVX-512 set out (the compiler's own macros)."""
    extensions = cpu_features.compiled_extensions(["-mavx2", "-mfma", "-mno-avx512f"])
    if extensions is None:
        pytest.skip("no C++ compiler")
    assert "AVX2" in extensions and "FMA" in extensions
    assert not [name for name in extensions if name.startswith("AVX512")]
    assert "AVX512F" in cpu_features.compiled_extensions(["-mavx512f"])


def test_describe_cpu_is_one_line_with_the_model_and_bfloat16():
    line = cpu_features.describe_cpu()
    assert "\n" not in line and cpu_features.cpu_model() in line and "native bfloat16:" in line
    assert "fused kernels:" in line


def bf16_run(tmp_path: Path, precision: str) -> None:
    run_training([
        "--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", precision,
        f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.precision={precision}", "--trainer.callbacks=[]",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
    ])


@pytest.mark.parametrize("cpuinfo, precision, warned", [
    (EPYC_AVX2, "bf16-mixed", True),
    (SAPPHIRE_RAPIDS, "bf16-mixed", False),
    (EPYC_AVX2, "32-true", False),
], ids=["emulated-bf16", "native-bf16", "float32"])
def test_training_warns_once_when_bfloat16_is_emulated(tmp_path, capsys, monkeypatch, cpuinfo, precision, warned):
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: cpuinfo)
    bf16_run(tmp_path, precision)
    lines = [line for line in capsys.readouterr().err.splitlines() if "without native bfloat16" in line]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert "AMD EPYC 7B12" in lines[0] and "32-true" in lines[0]


def test_an_analysis_in_bfloat16_on_such_a_cpu_warns(tiny_model_dirs, capsys, monkeypatch):
    from sparse_viz.pretrained.loading import load_model

    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: EPYC_AVX2)
    load_model(tiny_model_dirs["llama"], device="cpu", dtype="bfloat16")
    lines = [line for line in capsys.readouterr().err.splitlines() if "without native bfloat16" in line]
    assert len(lines) == 1 and "--dtype float32" in lines[0]
    load_model(tiny_model_dirs["llama"], device="cpu", dtype="float32")
    assert "without native bfloat16" not in capsys.readouterr().err


def test_extra_kernel_flags_make_a_build_of_their_own():
    """SPARSE_VIZ_FUSED_CFLAGS=-mno-avx512f (an AVX2 build on an AVX-512 machine, to test or time
    that path) gets its own name, so it never loads, or replaces, the -march=native build."""
    code = ("from sparse_viz.model import fused_kernels as f; "
            "print(f._build_name(f.BUILD_FLAGS), f.BUILD_FLAGS[-1])")
    names = {}
    for extra in ("", "-mno-avx512f"):
        env = {**os.environ, "SPARSE_VIZ_FUSED_CFLAGS": extra}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        names[extra] = out.stdout.split()
    assert names["-mno-avx512f"][1] == "-mno-avx512f"
    assert names[""][0] != names["-mno-avx512f"][0]
