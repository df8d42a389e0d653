"""Every PATCHC_* environment switch, parsed in one place.

The environment is read once, at the first call of settings() (not at import), and kept as a frozen Settings;
every module of patchc, patchc.passes, patchc.codegen, bench/ and tests/ reads its switches from there. A process
that changes a switch mid-way calls reload() (it re-reads the environment) or, better, uses override():

    from patchc import config
    with config.override(pdl=False):      # what PATCHC_PDL=0 does, for this block only
        ...

One convention for booleans: 1 / true / yes / on and 0 / false / no / off (any case); anything else is an error
naming the variable. Paths expand `~`. This module imports nothing but the standard library, so every layer
(codegen included) may read it.

| variable | field | default | what it does |
|---|---|---|---|
| PATCHC_EAGER_KERNELS | eager_kernels | 1 | eager GPU calls of a HybridLinear run the generated kernel directly (0: the reference op, decompress + F.linear) |
| PATCHC_KERNELS_ON_CPU | kernels_on_cpu | 0 | with TRITON_INTERPRET=1, whole models run the Triton kernels on the CPU (tests) |
| PATCHC_MASK_KERNELS | mask_kernels | 1 | mask learning forms W * M and its logit gradients with the Triton kernels of patchc/mask_kernels.py on the GPU (0: torch ops) |
| PATCHC_CUDA_GRAPHS | cuda_graphs | 0 | `patchc prune` replays its training step from CUDA graphs (patchc/step_graph.py) where it can, as --cuda-graphs does; where it cannot (CPU, torchrun, compile, ...) the run logs why and stays eager |
| PATCHC_AUTOTUNE | autotune | 0 | time every candidate config on the first call of a (shape, density, M bucket) and cache the winner |
| PATCHC_CACHE | cache | ~/.cache/patchc | the tuning cache (kernels/), the token cache (tokens/) and the downloaded SmolLM2 GGUF |
| PATCHC_SMOLLM2 | smollm2 | unset | the SmolLM2-135M GGUF file `smollm2-135m` resolves to (before ../shared/assets and the cache) |
| PATCHC_MMA_SP | mma_sp | 1 | the sparse-tensor-core decode kernel (codegen/mma_sp.cu; 0: the Triton kernels) |
| PATCHC_MMA_SP_STAGED | mma_sp_staged | 1 | its variant staging weights through shared memory at M <= 8 (sm_90+) |
| PATCHC_WGMMA | wgmma | 1 | the Hopper GEMM (codegen/wgmma.cu) for prefill and tall-layer decode (sm_90a) |
| PATCHC_WGMMA_DECODE | wgmma_decode | 1 | its 16-token decode CTAs (0: decode on the mma.sp kernel) |
| PATCHC_WGMMA_HALF | wgmma_half | 1 | its half-row-tile decode CTAs (0: two row-tiles a CTA only) |
| PATCHC_PDL | pdl | 1 | launch the CUDA kernels as programmatic dependents inside CUDA graph captures (sm_90+) |
| PATCHC_CSLT | cslt | 1 | cuSPARSELt for layers with no dense tile at large M, inside CUDA graphs |
| PATCHC_CSLT_EAGER | cslt_eager | 0 | cuSPARSELt on eager calls too (its per-call host setup is ~0.5 ms) |
| PATCHC_CSLT_SEARCH | cslt_search | 1 | search cuSPARSELt's algorithm once per shape and M bucket (0: its default) |
| PATCHC_SHARED | shared | ../shared beside the checkout | where tests and bench/accuracy.py find the shared assets and data |
| PATCHC_TEST_DEVICE | test_device | cuda if available, else cpu | the device the kernel property tests run on |
| PATCHC_TEST_SHAPES | test_shapes | unset | `llama2-7b`: the property tests also draw the LLaMA-2-7B layer shapes |
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    """The one boolean convention: unset or empty -> default; 1/true/yes/on; 0/false/no/off; else ValueError."""
    if value is None or value.strip() == "":
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def _path(value: str | None) -> Path | None:
    return None if value is None or value.strip() == "" else Path(value).expanduser()


@dataclass(frozen=True)
class Settings:
    """The parsed switches (see the module's table). Frozen and hashable: kernel-choice caches key on it."""
    eager_kernels: bool = True
    kernels_on_cpu: bool = False
    mask_kernels: bool = True
    cuda_graphs: bool = False
    autotune: bool = False
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "patchc")
    smollm2: Path | None = None
    mma_sp: bool = True
    mma_sp_staged: bool = True
    wgmma: bool = True
    wgmma_decode: bool = True
    wgmma_half: bool = True
    pdl: bool = True
    cslt: bool = True
    cslt_eager: bool = False
    cslt_search: bool = True
    shared: Path | None = None
    test_device: str | None = None
    test_shapes: str | None = None

    @staticmethod
    def env_name(field_name: str) -> str:
        return "PATCHC_" + field_name.upper()

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        kw = {}
        for f in fields(cls):
            raw = env.get(cls.env_name(f.name))
            if f.type in ("bool", bool):
                kw[f.name] = parse_bool(cls.env_name(f.name), raw, f.default)
            elif f.name in ("cache", "smollm2", "shared"):
                p = _path(raw)
                if p is not None:
                    kw[f.name] = p
            elif raw is not None and raw.strip():
                kw[f.name] = raw.strip()
        s = cls(**kw)
        if s.kernels_on_cpu and env.get("TRITON_INTERPRET") != "1":
            s = dataclasses.replace(s, kernels_on_cpu=False)   # only meaningful under Triton's interpreter
        return s

    def switch(self, field_name: str) -> str:
        """How to turn this switch off, for messages: e.g. "PATCHC_MMA_SP=0"."""
        return f"{self.env_name(field_name)}=0"


_lock = threading.Lock()
_current: Settings | None = None


def settings() -> Settings:
    """The switches, parsed from the environment at the first call."""
    global _current
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _current = Settings.from_env()
            s = _current
    return s


def reload() -> Settings:
    """Parse the environment again (after a process changed a PATCHC_* variable)."""
    global _current
    with _lock:
        _current = Settings.from_env()
        return _current


@contextlib.contextmanager
def override(**changes):
    """Switches changed for the duration of a block (tests, benchmarks): override(pdl=False, mma_sp=False)."""
    global _current
    old = settings()
    with _lock:
        _current = dataclasses.replace(old, **changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = old
