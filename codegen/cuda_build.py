"""Build the CUDA C++ kernels (mma_sp.cu, wgmma.cu) once per machine and version, with
torch.utils.cpp_extension, lazily and thread-safely; a kernel that cannot be built (no nvcc, no
compiler) warns once, naming the reason, and its callers keep the Triton kernels."""
from __future__ import annotations

import hashlib
import sys
import threading
import warnings
from pathlib import Path


COMMON = Path(__file__).with_name("device_common.cuh")
COMMON_INCLUDE = '#include "device_common.cuh"'


def inline_common(src: str) -> str:
    """`src` with device_common.cuh (the device helpers mma_sp.cu and wgmma.cu share) pasted where it is included,
    so that the build's hash covers it (an older source without the include is returned as it is)."""
    return src.replace(COMMON_INCLUDE, COMMON.read_text(), 1)


class CudaKernel:
    """One extension: `name` prefixes the build (suffixed by a hash of the source, so an edited kernel builds
    anew), `source()` returns the CUDA source, `decl` declares `functions` for the bindings."""

    def __init__(self, name: str, what: str, source, decl: str, functions: list[str], flags: list[str],
                 env_off: str):
        self.name, self.what, self.source, self.decl = name, what, source, decl
        self.functions, self.flags, self.env_off = functions, flags, env_off
        self._lock = threading.Lock()
        self._ext = None
        self.error: str | None = None

    def extension(self):
        """The compiled extension (built on first use, then cached by torch in ~/.cache/torch_extensions),
        or None with a warning naming the reason if it cannot be built here."""
        if self._ext is not None or self.error is not None:
            return self._ext
        with self._lock:
            if self._ext is not None or self.error is not None:
                return self._ext
            try:
                self._ext = self.build(self.source())
            except Exception as e:  # noqa: BLE001 - no nvcc / no compiler: the Triton kernels still run
                msg = str(e).strip()
                self.error = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
                warnings.warn(f"patchc: the {self.what} could not be built ({self.error}); the Triton kernels "
                              f"run instead. Set {self.env_off}=0 to silence this.", stacklevel=3)
        return self._ext

    def build(self, src: str):
        """Compile (or load from torch's extension cache) the kernel source `src`."""
        from torch.utils.cpp_extension import load_inline

        name = f"{self.name}_{hashlib.sha256(src.encode()).hexdigest()[:12]}"
        if not built(name):
            print(f"patchc: building the {self.what} with nvcc (once per machine and version, about a minute; "
                  "cached in ~/.cache/torch_extensions)", file=sys.stderr, flush=True)
        return load_inline(name, cpp_sources=self.decl, cuda_sources=src, functions=self.functions,
                           extra_cuda_cflags=self.flags, verbose=False)


def built(name: str) -> bool:
    """Whether torch's extension cache already holds this build (so loading it is quick)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # noqa: BLE001 - a private helper: if it moves, only the message is lost
        return False
