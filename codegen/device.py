"""Per-device facts the launchers ask on every call, looked up once: compute capability and SM count.

torch.cuda.get_device_capability / get_device_properties cost a few microseconds of Python each; an eager
decode step asks them for every layer, so they are cached here by device.
"""
from __future__ import annotations

import torch

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
