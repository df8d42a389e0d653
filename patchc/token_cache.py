"""Token cache on disk: one flat binary token array per (tokenizer, file content), memory-mapped on use.

An entry is `<key>.bin` (the tokens, uint16 when the vocabulary fits, else int32) and `<key>.json` (n_tokens,
dtype, tokenizer fingerprint, source file, format, patchc version). key = sha256(tokenizer fingerprint + sha256
of the file's bytes + FORMAT), so the same content anywhere hits the cache. Both are written atomically, the
sidecar last: an entry without a sidecar, or whose .bin size disagrees with it, is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np

from patchc.io import atomic_path, write_json

HASH_BLOCK = 1 << 20
FORMAT = 1  # bump when how files become token streams changes: older entries then miss


def _version() -> str:
    try:
        return importlib.metadata.version("patchc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path:
    from patchc.config import settings

    return Path(settings().cache) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the fast tokenizer's serialised JSON (a slow one: its sorted vocabulary) and the eos id."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= 1 << 16 else np.dtype(np.int32)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def entry_key(fingerprint: str, content_sha256: str) -> str:
    return hashlib.sha256(f"{fingerprint}:{content_sha256}:{FORMAT}".encode()).hexdigest()


class TokenCache:
    def __init__(self, cache_dir: str | os.PathLike | None, fingerprint: str, dtype: np.dtype):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.fingerprint, self.dtype = fingerprint, np.dtype(dtype)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.bin", self.dir / f"{key}.json"

    def lookup(self, key: str) -> int | None:
        """The entry's token count, or None when it is missing, unreadable, or its size is off (rebuild it)."""
        bin_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            n, size = int(meta["n_tokens"]), bin_path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if meta.get("dtype") != self.dtype.name or meta.get("tokenizer") != self.fingerprint:
            return None
        return n if size == n * self.dtype.itemsize else None

    def write(self, key: str, pieces, source: dict) -> int:
        """Stream the token arrays of `pieces` into the entry; returns its token count."""
        bin_path, meta_path = self.paths(key)
        n = 0
        with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
            for ids in pieces:
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
                    raise ValueError(f"token id out of range for {self.dtype.name} in {source['name']}")
                f.write(arr.astype(self.dtype).tobytes())
                n += arr.size
            f.flush()
        write_json(meta_path, {"n_tokens": n, "dtype": self.dtype.name, "tokenizer": self.fingerprint,
                               "source": source, "format": FORMAT, "patchc_version": _version()})
        return n

    def open(self, key: str, n_tokens: int) -> np.ndarray:
        if n_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.paths(key)[0], dtype=self.dtype, mode="r", shape=(n_tokens,))
