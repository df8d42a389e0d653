"""Perplexity on non-overlapping windows: PPL = exp(mean next-token cross-entropy over all windows)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchc.data import chunk, tokenize_files


@torch.no_grad()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, seq_len: int = 2048,
               batch_size: int = 1, max_windows: int | None = None, device: str | torch.device = "cpu",
               desc: str = "ppl", progress: bool = True) -> dict:
    """logits_fn: input_ids [B, S] -> logits [B, S, V]. Windows of `seq_len`, the remainder dropped;
    every window predicts its tokens 1..S-1 from the ones before (no context across windows)."""
    windows = chunk(tokens, seq_len, "evaluation text")
    if max_windows is not None:
        windows = windows[:max_windows]
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[i: i + batch_size].to(device)
        logits = logits_fn(ids)  # [B, S, V]
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    mean = nll / count
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "windows": len(windows),
            "seq_len": seq_len, "tokens": count}


def hf_logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def eval_file_tokens(tokenizer, path: str) -> torch.Tensor:
    """A text file tokenised as-is (no separators, no end-of-text token added)."""
    tokens = tokenize_files(tokenizer, [path])
    if tokenizer.eos_token_id is not None and tokens[-1].item() == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return tokens


def perplexity_of_file(logits_fn, tokenizer, path: str, seq_len: int = 2048, **kw) -> dict:
    """Tokenise a text file as-is and evaluate it."""
    out = perplexity(logits_fn, eval_file_tokens(tokenizer, path), seq_len=seq_len, **kw)
    out["file"] = str(path)
    return out
