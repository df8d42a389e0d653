"""Text files -> token sequences.

    corpus = TokenCorpus.build(tokenizer, ["calib/c4", "calib/wiki"], progress=True)   # cached, memory-mapped
    ids = corpus.sequences(batch_indices(corpus.num_sequences(L), step, batch, seed), L)  # [batch, L] int64

A .jsonl file gives one document per line (its "text"); any other file is one document. Every document is
followed by the tokenizer's end-of-text token. Files are tokenised once per (tokenizer, content) into the
token cache (patchc/token_cache.py) and read back through memory maps; sequences are non-overlapping windows
over the concatenation of all files in sorted path order, crossing file boundaries, the remainder dropped.
"""
from __future__ import annotations

import bisect
import json
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from patchc.token_cache import TokenCache, entry_key, file_sha256, token_dtype, tokenizer_fingerprint

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")
SNIFF_BYTES = 64 << 10  # the head checked for binary content before any slow work
PIECE_BYTES = 1 << 20  # text files are read and tokenised in pieces of about 1 MB
FORMATS = "--data takes UTF-8 text files or .jsonl files with a string field 'text' per line"


class DataError(ValueError):
    """Training or evaluation data that cannot be used, with what to do about it."""


# ---------------------------------------------------------------------------------------------------------
# Files and checks (cheap, before any tokenising)

def data_files(paths: list[str]) -> list[Path]:
    """The files named: files as given, folders expanded to their text files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inner = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not inner:
                raise DataError(f"data folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files: "
                                "put text files in it or remove it from --data")
            files += inner
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data file {p} does not exist: check the path given to --data")
    if not files:
        raise DataError(f"no data given: {FORMATS}")
    return files


def check_data_paths(paths: list[str]) -> list[Path]:
    """File-level checks without tokenising (existence, readable, the head not binary): call it before
    loading a model. Returns the files."""
    files = data_files(paths)
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(SNIFF_BYTES)
        except OSError as e:
            raise DataError(f"data file {f} cannot be read ({e.strerror}): check its permissions") from None
        if b"\0" in head:
            raise DataError(f"data file {f} is binary (a NUL byte at offset {head.index(0)}): {FORMATS}; "
                            "remove it from --data") from None
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if not (len(head) == SNIFF_BYTES and e.reason == "unexpected end of data"):  # a cut-off last char
                raise _not_utf8(f, e.start, e.reason) from None
    return files


def _not_utf8(path, offset: int, reason: str) -> DataError:
    return DataError(f"data file {path} is not valid UTF-8 at byte offset {offset} ({reason}): {FORMATS}; "
                     "re-encode it (e.g. iconv -f latin1 -t utf-8) or remove it from --data")


def _decode(raw: bytes, offset: int, path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, offset + e.start, e.reason) from None


# ---------------------------------------------------------------------------------------------------------
# Reading documents, streamed

# Pieces of a text file are cut before the whitespace after an ASCII letter or digit, preferably at a blank
# line: byte-level BPE pre-tokenisers (GPT-2, Llama-3, Qwen2, SmolLM2) split there anyway, so the pieces
# tokenise to exactly the whole file's tokens.
_DOC_CUT = re.compile(rb"[A-Za-z0-9](?=[ \t\r]*\n[ \t\r]*\n)")
_WORD_CUT = re.compile(rb"[A-Za-z0-9](?=\s)")


def _cut(buf: bytes, at: int, force: bool) -> int | None:
    if m := _DOC_CUT.search(buf, at):
        return m.start() + 1
    if not force:
        return None
    if m := _WORD_CUT.search(buf, at):
        return m.start() + 1
    while at > 0 and buf[at] & 0xC0 == 0x80:  # no safe cut: at least not inside a UTF-8 character
        at -= 1
    return at


def text_pieces(path, piece_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) pieces of a file of a little over piece_bytes (default PIECE_BYTES): cut at the first
    document boundary after it, else (at twice that) after a word."""
    piece_bytes = piece_bytes or PIECE_BYTES
    with open(path, "rb") as f:
        buf, offset = b"", 0
        while block := f.read(max(piece_bytes // 8, 1)):
            buf += block
            if len(buf) > piece_bytes and (cut := _cut(buf, piece_bytes, force=len(buf) >= 2 * piece_bytes)):
                yield offset, buf[:cut]
                offset, buf = offset + cut, buf[cut:]
        if buf:
            yield offset, buf


def jsonl_texts(path) -> Iterator[str]:
    """The 'text' of every non-blank line, checked: UTF-8, JSON, a string field 'text'."""
    with open(path, "rb") as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            line, offset = _decode(raw, offset, path), offset + len(raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}): a .jsonl file holds one JSON object "
                                "per line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{i}: a jsonl record needs a string field 'text' (the document)")
            yield rec["text"]


def scan_file(path) -> bool:
    """Read a whole file the way tokenising will, raising DataError on what tokenising would trip on;
    returns whether it holds any text."""
    if Path(path).suffix == ".jsonl":
        return any([t.strip() for t in jsonl_texts(path)])  # a list: check every line
    return any([bool(_decode(raw, off, path).strip()) for off, raw in text_pieces(path)])


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= PIECE_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def file_tokens(tokenizer, path, progress=None) -> Iterator[list[int]]:
    """The token stream of one file that holds text (scan_file), in pieces: each document's tokens, then the
    end-of-text token. A text file is one document, tokenised in pieces (see _cut); jsonl lines in batches."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if Path(path).suffix == ".jsonl":
        for batch in _batches(t for t in jsonl_texts(path) if t.strip()):
            yield [t for doc in tokenizer(batch, add_special_tokens=False)["input_ids"] for t in doc + eos]
            if progress is not None:
                progress.update(sum(map(len, batch)))
        return
    for off, raw in text_pieces(path):
        yield tokenizer(_decode(raw, off, path), add_special_tokens=False)["input_ids"]
        if progress is not None:
            progress.update(len(raw))
    yield eos


# ---------------------------------------------------------------------------------------------------------
# The corpus: cached token files, memory-mapped, windows over their concatenation

class CorpusFile(NamedTuple):
    path: str
    n_tokens: int


class TokenCorpus:
    """The token streams of files (sorted by path), read through memory maps: memory does not grow with size."""

    def __init__(self, files: list[CorpusFile], arrays: list[np.ndarray], cache_dir: Path | None = None,
                 hits: int = 0):
        self.files, self.cache_dir, self.hits = files, cache_dir, hits
        self._arrays = [a for a in arrays if len(a)]
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays]).tolist()
        self.n_tokens = int(self._starts[-1])

    @classmethod
    def build(cls, tokenizer, paths: list[str], cache_dir: str | os.PathLike | None = None,
              progress: bool = False) -> "TokenCorpus":
        """Check every file, then tokenise those not in the cache (cache_dir: default $PATCHC_CACHE/tokens or
        ~/.cache/patchc/tokens). Raises DataError, before tokenising anything, on bad files."""
        files = sorted({Path(os.path.abspath(f)) for f in check_data_paths(paths)})
        cache = TokenCache(cache_dir, tokenizer_fingerprint(tokenizer), token_dtype(tokenizer))
        keys, counts, todo = [], {}, {}
        for f in files:  # hash everything, read every file not cached in full: all errors before slow work
            key = entry_key(cache.fingerprint, sha := file_sha256(f))
            keys.append(key)
            if key in counts or key in todo:
                continue
            if (n := cache.lookup(key)) is not None:
                counts[key] = n
            else:
                todo[key] = (f, sha, scan_file(f))
        hits = len(counts)
        if not any(counts.values()) and not any(has_text for _, _, has_text in todo.values()):
            raise DataError(f"data {', '.join(map(str, paths))} holds no text: {FORMATS}")
        total = sum(f.stat().st_size for f, _, has_text in todo.values() if has_text)
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=not progress,
                  delay=2.0) as bar:
            for key, (f, sha, has_text) in todo.items():
                source, done = {"name": f.name, "size": f.stat().st_size, "sha256": sha}, bar.n
                counts[key] = cache.write(key, file_tokens(tokenizer, f, bar) if has_text else [], source)
                bar.update(done + source["size"] * has_text - bar.n)  # jsonl counts text, not bytes
        arrays = [cache.open(k, counts[k]) for k in keys]
        return cls([CorpusFile(str(f), counts[k]) for f, k in zip(files, keys)], arrays, cache.dir, hits)

    def num_sequences(self, seq_len: int, what: str = "training data") -> int:
        n = self.n_tokens // seq_len
        if n == 0:
            raise DataError(f"{what} has {self.n_tokens} tokens, fewer than one sequence of {seq_len}: "
                            "add text or lower --seq-len")
        return n

    def sequences(self, index: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Windows `index` of length seq_len -> [len(index), seq_len] int64."""
        index = torch.as_tensor(index).reshape(-1).tolist()
        n = self.num_sequences(seq_len)
        out = np.empty((len(index), seq_len), dtype=np.int64)
        for row, i in enumerate(index):
            if not 0 <= i < n:
                raise IndexError(f"sequence {i} out of range: {n} sequences of {seq_len}")
            start, pos = i * seq_len, 0
            f = bisect.bisect_right(self._starts, start) - 1
            while pos < seq_len:  # a window may run over into the next files
                a, off = self._arrays[f], start + pos - self._starts[f]
                take = min(seq_len - pos, len(a) - off)
                out[row, pos: pos + take] = a[off: off + take]
                pos, f = pos + take, f + 1
        return torch.from_numpy(out)


class TrainingWindows:
    """A corpus's windows of one seq_len without a held-out set: training index i is the i-th kept window, so
    batch_indices / calibration_indices over num_sequences() never reach a held-out window."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, held: torch.Tensor):
        self.corpus, self.seq_len = corpus, seq_len
        self.files, self.hits, self.cache_dir = corpus.files, corpus.hits, corpus.cache_dir
        n = corpus.num_sequences(seq_len)
        keep = np.ones(n, dtype=bool)
        keep[held.numpy()] = False
        self._keep = np.flatnonzero(keep)                               # [n - len(held)] window indices
        self.n_tokens = len(self._keep) * seq_len

    def num_sequences(self, seq_len: int, what: str = "training data") -> int:
        if seq_len != self.seq_len:
            raise ValueError(f"these training windows are of {self.seq_len} tokens, not {seq_len}")
        if not len(self._keep):
            raise DataError(f"{what}: every window is held out; lower --holdout or add text")
        return len(self._keep)

    def sequences(self, index: torch.Tensor, seq_len: int) -> torch.Tensor:
        index = torch.as_tensor(index).reshape(-1)
        n = self.num_sequences(seq_len)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < n):
            raise IndexError(f"training window out of range: {n} windows of {seq_len} outside the held-out set")
        return self.corpus.sequences(torch.from_numpy(self._keep[index.numpy()]), seq_len)


def holdout_indices(n_seq: int, n: int, seed: int) -> torch.Tensor:
    """n distinct windows held out of training (a validation set for tuning), a seeded draw of its own."""
    if n >= n_seq:
        raise DataError(f"--holdout {n} windows asked for, but the data has only {n_seq} sequences and training "
                        "needs some: lower --holdout (or --seq-len) or add text")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 0x401D)
    return torch.randperm(n_seq, generator=g)[:n].sort().values


# ---------------------------------------------------------------------------------------------------------
# Which windows: per step (seeded permutation per epoch), per rank, for calibration

def batch_indices(n_seq: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The sequence indices of a step's batch: a seeded permutation per epoch, so any step is reproducible."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_seq)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_seq, generator=g)
        take = min(batch - len(out), n_seq - offset)
        out += perm[offset: offset + take].tolist()
    return torch.tensor(out, dtype=torch.long)


def rank_slice(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of a global batch: the ranks' slices concatenate to `indices`."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world")
    if len(indices) % world:
        raise ValueError(f"global batch {len(indices)} is not divisible by world size {world}: "
                         "make the batch size a multiple of the number of processes")
    b = len(indices) // world
    return indices[rank * b: (rank + 1) * b]


def calibration_indices(n_seq: int, n: int, seed: int) -> torch.Tensor:
    """n distinct windows for one-shot calibration, a seeded draw over all of them (not step 0's order)."""
    if n > n_seq:
        raise DataError(f"{n} calibration samples asked for, but the data has only {n_seq} sequences: "
                        "add text or lower --calib-samples")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 0xCA11B)
    return torch.randperm(n_seq, generator=g)[:n]


# ---------------------------------------------------------------------------------------------------------
# In memory: evaluation text (a file tokenised whole, as-is) and the old training path

def read_documents(path: Path) -> list[str]:
    """A .jsonl file gives one document per line (its 'text' field); any other file is one document."""
    if Path(path).suffix == ".jsonl":
        return list(jsonl_texts(path))
    return [_decode(Path(path).read_bytes(), 0, path)]


def tokenize_files(tokenizer, paths: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """All documents in file order, tokenised whole and concatenated, an end-of-text token after each
    -> [tokens] int64, in memory (TokenCorpus streams and caches instead)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in check_data_paths(paths):
        for doc in read_documents(f):
            if not doc.strip():
                continue
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
            if max_tokens is not None and len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
    if not ids:
        raise DataError(f"data {', '.join(map(str, paths))} holds no text: {FORMATS}")
    return torch.tensor(ids, dtype=torch.long)


def chunk(tokens: torch.Tensor, seq_len: int, what: str = "data") -> torch.Tensor:
    """[tokens] -> [N, seq_len] non-overlapping windows (the remainder is dropped)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise DataError(
            f"{what} has {tokens.numel()} tokens, fewer than one sequence of {seq_len}: "
            "add text or lower --seq-len"
        )
    return tokens[: n * seq_len].reshape(n, seq_len)
