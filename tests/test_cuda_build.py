"""The CUDA kernels compile: codegen/mma_sp.cu for sm_80 and sm_90a, codegen/wgmma.cu for sm_90a, each exactly as
patchc.codegen builds it at run time (mma_sp.source() / wgmma.source(): device_common.cuh pasted in, the wgmma
wrappers generated, torch's headers, its host launchers instantiating every kernel template), compiled with nvcc
to an object file (-c, no link, no GPU needed; the host side at -O0 to keep it quick). Skipped only where nvcc is
absent."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
pytestmark = pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc is not installed")

SM90A = "-gencode=arch=compute_90a,code=sm_90a"
SM80 = "-gencode=arch=compute_80,code=sm_80"


def cuda_shim(tmp: Path) -> list[str]:
    """A CPU build of torch ships c10/cuda's headers but not the one its CMake generates for CUDA builds
    (c10/cuda/impl/cuda_cmake_macros.h); where it is missing, an include folder with the CUDA wheel's content."""
    from torch.utils import cpp_extension as ce

    if any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in ce.include_paths()):
        return []
    shim = tmp / "shim"
    (shim / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
    (shim / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(shim)]


def nvcc_command(src: Path, obj: Path, flags: list[str], gencode: str) -> list[str]:
    """What torch.utils.cpp_extension.load_inline runs for a CUDA source (its prelude, defines and includes), for
    one architecture, compile-only."""
    from torch.utils import cpp_extension as ce

    includes = [*ce.include_paths(), *cuda_shim(obj.parent), sysconfig.get_paths()["include"]]
    return [NVCC, "-c", str(src), "-o", str(obj), gencode, *flags, *ce.COMMON_NVCC_FLAGS,
            "-DTORCH_EXTENSION_NAME=patchc_build_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(__import__('torch')._C, '_GLIBCXX_USE_CXX11_ABI', True))}",
            "-std=c++17", "--compiler-options", "-fPIC", *[a for p in includes for a in ("-isystem", p)]]


def compile_source(text: str, tmp_path: Path, name: str, flags: list[str], gencodes: list[str]) -> subprocess.Popen:
    """Start nvcc on `text` (load_inline's prelude first) for every architecture in `gencodes` at once; -O0 for the
    host side only (nvcc's -O sets the host compiler's level; device code is optimised by ptxas as at run time)."""
    src = tmp_path / f"{name}.cu"
    src.write_text("#include <torch/types.h>\n#include <cuda.h>\n#include <cuda_runtime.h>\n" + text)
    obj = tmp_path / f"{name}.o"
    host_flags = [f for f in flags if not f.startswith(("-O", "-gencode"))] + ["-O0", "--threads", "0"]
    cmd = nvcc_command(src, obj, host_flags, gencodes[0]) + gencodes[1:]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str, obj: Path) -> None:
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, f"nvcc failed for {what}:\n{err[-4000:]}"
    assert obj.stat().st_size > 0


def test_cuda_kernels_compile(tmp_path):
    """Both kernels at once (two nvcc processes): mma_sp.cu for sm_80 and sm_90a, wgmma.cu for sm_90a. The host
    launchers instantiate every kernel template, so a template that does not compile for an architecture fails."""
    from patchc.codegen import mma_sp, wgmma

    for name in ("mma_sp", "wgmma"):
        (tmp_path / name).mkdir()
    jobs = [(compile_source(mma_sp.source(), tmp_path / "mma_sp", "mma_sp", mma_sp._KERNEL.flags, [SM80, SM90A]),
             "mma_sp.cu (sm_80, sm_90a)", tmp_path / "mma_sp" / "mma_sp.o"),
            (compile_source(wgmma.source(), tmp_path / "wgmma", "wgmma", wgmma._KERNEL.flags, [SM90A]),
             "wgmma.cu (sm_90a)", tmp_path / "wgmma" / "wgmma.o")]
    assert SM90A in wgmma._KERNEL.flags   # what the run-time build asks for
    for proc, what, obj in jobs:
        finish(proc, what, obj)


def test_nvcc_command_matches_the_runtime_build():
    """The command compiles what load_inline compiles: torch's nvcc flags and headers, C++17, the extension's
    defines."""
    from torch.utils import cpp_extension as ce

    cmd = nvcc_command(Path("/tmp/x.cu"), Path("/tmp/x.o"), ["-O3"], SM90A)
    assert cmd[:2] == [NVCC, "-c"] and SM90A in cmd and "-std=c++17" in cmd and "-O3" in cmd
    assert all(f in cmd for f in ce.COMMON_NVCC_FLAGS)
    assert all(p in cmd for p in ce.include_paths())
