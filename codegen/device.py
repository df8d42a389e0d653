"""Per-device facts the launchers ask on every call, looked up once: compute capability and SM count; and whether
a launch is made a programmatic dependent of the kernel before it.

torch.cuda.get_device_capability / get_device_properties cost a few microseconds of Python each; an eager
decode step asks them for every layer, so they are cached here by device.
"""
from __future__ import annotations


import torch

from patchc.config import settings

_capability: dict[torch.device, tuple[int, int]] = {}
_sm_count: dict[torch.device, int] = {}


def _key(device) -> torch.device:
    d = torch.device(device)
    return torch.device(d.type, torch.cuda.current_device() if d.index is None else d.index)


def capability(device) -> tuple[int, int]:
    """(major, minor) of a CUDA device."""
    try:
        return _capability[device]
    except KeyError:
        cap = _capability[device] = torch.cuda.get_device_capability(_key(device))
        return cap


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    try:
        return _sm_count[device]
    except KeyError:
        n = _sm_count[device] = torch.cuda.get_device_properties(_key(device)).multi_processor_count
        return n


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether the CUDA kernels (mma_sp.cu, wgmma.cu) are launched as programmatic dependents: on sm_90+, only while
    a CUDA graph is captured (as torch.compile's reduce-overhead mode runs a model). Such a launch may start its CTAs
    while the previous kernel drains: they read the schedule and issue the first weight copies, and wait for that
    kernel before reading x (H100, bench/results/decode: `default` vs `default_plain`). PATCHC_PDL=0: never."""
    return (settings().pdl and capability(x.device) >= (9, 0)
            and torch.cuda.is_current_stream_capturing())
