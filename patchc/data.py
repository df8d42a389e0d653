"""Text files -> token sequences: read .txt / .jsonl (or folders of them), tokenise, concatenate, chunk."""
from __future__ import annotations

from pathlib import Path

import torch

from patchc.io import iter_jsonl

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")


class DataError(ValueError):
    """Training or evaluation data that cannot be used, with what to do about it."""


def data_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inner = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not inner:
                raise DataError(f"data folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += inner
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data file {p} does not exist")
    if not files:
        raise DataError("no data given: pass --data FILE_OR_FOLDER (text or jsonl with a 'text' field)")
    return files


def read_documents(path: Path) -> list[str]:
    """A .jsonl file gives one document per line (its 'text' field); any other file is one document."""
    if path.suffix == ".jsonl":
        docs = []
        for i, rec in iter_jsonl(path, DataError):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{i}: a jsonl record needs a string field 'text'")
            docs.append(rec["text"])
        return docs
    return [path.read_text(encoding="utf-8", errors="replace")]


def tokenize_files(tokenizer, paths: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """All documents tokenised and concatenated, an end-of-text token after each -> [tokens] int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in data_files(paths):
        for doc in read_documents(f):
            if not doc.strip():
                continue
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
            if max_tokens is not None and len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
    if not ids:
        raise DataError(f"data {paths} holds no text")
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
