"""Zero-shot accuracy scored exactly as lm-eval (0.4.x, HFLM) scores it, on local jsonl task files.

Each item becomes loglikelihood requests (context, continuation):
  piqa, arc_easy  multiple choice: ("Question: ...\\nAnswer:", " " + choice) per choice (lm-eval's templates);
                  acc = argmax loglikelihood, acc_norm = argmax loglikelihood / len(choice in characters)
  winogrande      multiple input: (sentence up to the blank + option, " " + rest of the sentence) per option;
                  acc as above; acc_norm divides by the length of each option's context (lm-eval's rule)
  lambada_openai  cloze: (context, " " + last word); acc = every continuation token is the greedy argmax
Tokenisation follows lm-eval's causal path: trailing spaces of the context move to the continuation,
the pair is encoded whole and split at the context's length, and inputs are left-truncated to the
model's window. tests/test_zeroshot.py checks these numbers against lm-eval itself on the same items.

Data format (../shared/assets/data/zeroshot, from llm-foundry): piqa/arc_easy {"query", "choices", "gold"},
winogrande {"context_options", "continuation", "gold"}, lambada_openai {"context", "continuation"}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchc.io import iter_jsonl

TASKS = ("piqa", "arc_easy", "winogrande", "lambada_openai")
MULTIPLE_CHOICE = ("piqa", "arc_easy", "winogrande")


class TaskError(ValueError):
    """A task file that is missing or does not follow its format."""


@dataclass
class Item:
    requests: list[tuple[str, str]]   # (context, continuation) per choice; one for cloze tasks
    gold: int                         # index of the right choice (0 for cloze)
    norm_text: list[str]              # the strings whose lengths acc_norm divides by


def _context(query: str) -> str:
    # llm-foundry's "Question: {goal}\n" (piqa) / "Question: {question}" (arc) -> lm-eval's "Question: ...\nAnswer:"
    return (query[:-1] if query.endswith("\n") else query) + "\nAnswer:"


def parse_item(task: str, doc: dict) -> Item:
    try:
        if task in ("piqa", "arc_easy"):
            choices = [str(c) for c in doc["choices"]]
            return Item([(_context(doc["query"]), " " + c) for c in choices], int(doc["gold"]), choices)
        if task == "winogrande":
            contexts = [str(c) for c in doc["context_options"]]
            return Item([(c, " " + doc["continuation"]) for c in contexts], int(doc["gold"]), contexts)
        if task == "lambada_openai":
            return Item([(doc["context"], " " + doc["continuation"])], 0, [doc["continuation"]])
    except (KeyError, TypeError, ValueError) as e:
        raise TaskError(f"{task}: item {str(doc)[:80]!r} lacks a field ({e}); see patchc/zeroshot.py for the format") from None
    raise TaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def load_task(task: str, path: str | Path, limit: int | None = None) -> list[Item]:
    """Items of `task` from a jsonl file (or a folder holding TASK.jsonl), the first `limit` only if given."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{task}.jsonl"
    if not p.is_file():
        raise TaskError(f"zero-shot file {p} not found (expected TASK.jsonl under ../shared/assets/data/zeroshot)")
    items = []
    for _, doc in iter_jsonl(p, TaskError):
        if limit is not None and len(items) >= limit:
            break
        items.append(parse_item(task, doc))
    if not items:
        raise TaskError(f"{p} holds no items")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal encoding: move trailing spaces to the continuation, encode the whole string and
    split it at the context's token length."""
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(logits_fn: Callable[[torch.Tensor], torch.Tensor], tokenizer, requests: list[tuple[str, str]],
                   max_length: int = 2048, batch_tokens: int = 16384, device: str | torch.device = "cpu",
                   progress: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request.
    Requests are batched by length (longest first, right-padded: causal logits ignore later padding)."""
    enc = []
    for i, (ctx, cont) in enumerate(requests):
        c, t = encode_pair(tokenizer, ctx, cont)
        if not t:
            raise TaskError(f"request {i}: the continuation {cont!r} encodes to no tokens")
        full = (c + t)[-(max_length + 1):][:-1]   # the model input; it predicts the last len(t) tokens
        enc.append((i, full, t))
    enc.sort(key=lambda e: -len(e[1]))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(enc), desc=desc, disable=not progress, leave=False)
    start = 0
    while start < len(enc):
        width = len(enc[start][1])
        n = max(1, min(len(enc) - start, batch_tokens // max(1, width)))
        chunk = enc[start: start + n]
        ids = torch.full((n, width), pad, dtype=torch.long)
        for r, (_, full, _) in enumerate(chunk):
            ids[r, : len(full)] = torch.tensor(full)
        logits = logits_fn(ids.to(device))                                           # [n, width, V]
        for r, (i, full, t) in enumerate(chunk):
            pos = torch.arange(len(full) - len(t), len(full), device=logits.device)
            lp = F.log_softmax(logits[r, pos].float(), dim=-1)                       # [len(t), V]
            target = torch.tensor(t, device=lp.device)
            ll = lp.gather(-1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            out[i] = (ll, greedy)
        start += n
        bar.update(n)
    bar.close()
    return out  # type: ignore[return-value]


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best  # first of ties, like numpy


def score(task: str, items: list[Item], results: list[tuple[float, bool]]) -> dict:
    """lm-eval's metrics for `task` from the flattened per-request results."""
    k, acc, acc_norm, ll_sum = 0, 0, 0, 0.0
    for it in items:
        res = results[k: k + len(it.requests)]
        k += len(it.requests)
        lls = [r[0] for r in res]
        if task in MULTIPLE_CHOICE:
            acc += _argmax(lls) == it.gold
            acc_norm += _argmax([ll / len(s) for ll, s in zip(lls, it.norm_text)]) == it.gold
        else:
            acc += res[0][1]
            ll_sum += lls[0]
    n = len(items)
    out = {"task": task, "n": n, "acc": acc / n}
    if task in MULTIPLE_CHOICE:
        out["acc_norm"] = acc_norm / n
    else:
        out["ppl"] = math.exp(-ll_sum / n)   # lm-eval's lambada perplexity: exp(-mean loglikelihood)
    return out


def evaluate_zeroshot(logits_fn, tokenizer, data_dir: str | Path, tasks=TASKS, limit: int | None = None,
                      max_length: int = 2048, batch_tokens: int = 16384, device="cpu", progress: bool = True) -> dict:
    """{task: metrics} plus "average_acc" (mean acc over the tasks)."""
    results = {}
    for task in tasks:
        items = load_task(task, data_dir, limit)
        reqs = [r for it in items for r in it.requests]
        res = loglikelihoods(logits_fn, tokenizer, reqs, max_length, batch_tokens, device, progress, desc=task)
        results[task] = score(task, items, res)
    results["average_acc"] = sum(results[t]["acc"] for t in tasks) / len(tasks)
    return results
