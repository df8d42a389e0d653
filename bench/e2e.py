"""End to end: a LLaMA-shaped model with random bf16 weights, HF generate() with a static KV cache,
dense (inductor) vs patch hybrid layers at several sparsities (the paper's protocol: batch 16,
128 prompt + 128 new tokens, CUDA graphs).

Per-layer sparsities are non-uniform around the target: every layer gets a random importance
u ~ U(-1, 1), tile scores are 0.5 u + U(0, 1), and one exact global top-k (patchc.mask.select_dense_tiles)
keeps the dense tiles, so the global sparsity is exact and layers range widely around it.

    python bench/e2e.py --out bench/results/e2e            # 7B shape on the GPU, rows alternated --repeats times
    python bench/e2e.py --quick --device cpu --out /tmp/e  # tiny shape, for tests
    python bench/e2e.py --ckpt CKPT --out DIR              # a `patchc lower` checkpoint (patchc.load) vs its dense twin
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from patchc import mask as hm
from patchc.format import pack_layer
from patchc.lower import stack_groups_
from patchc.runtime import HybridLinear
from patchc.speed import time_generate

from report import machine_env, stats, write_report  # bench/report.py

SEVEN_B = dict(layers=32, hidden=4096, ffn=11008, heads=32, vocab=32000)
QUICK = dict(layers=2, hidden=256, ffn=512, heads=4, vocab=384)


def build(shape: dict, device, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      vocab_size=shape["vocab"], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.eval()


@torch.no_grad()
def hybridize_(model, sparsity: float, tile: int, seed: int = 0, plain_dense: bool = True) -> dict:
    """Replace every decoder linear by a HybridLinear at an exact global sparsity (non-uniform per layer); layers
    left with no 2:4 tile run as plain dense linears unless plain_dense=False (as patchc.load does)."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    scores = []
    for n in names:
        w = model.get_submodule(n).weight
        u = torch.rand(1, generator=g).item() * 2 - 1
        scores.append(0.5 * u + torch.rand(w.shape[0] // tile, w.shape[1] // tile, generator=g))
    bitmaps = hm.select_dense_tiles(scores, sparsity)
    per_layer = []
    for n, bm in zip(names, bitmaps):
        lin = model.get_submodule(n)
        w = lin.weight
        pattern = torch.randint(0, 6, (w.shape[0], w.shape[1] // 4), generator=g, dtype=torch.uint8)
        p = pack_layer(w, bm.to(w.device), pattern.to(w.device), tile)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, HybridLinear(p, lin.bias, name=n, plain_dense=plain_dense))
        per_layer.append(p.sparsity)
        del lin
    # as patchc.load does for a lowered checkpoint: q/k/v and gate/up share one allocation each (one launch)
    groups = []
    for i in range(model.config.num_hidden_layers):
        pre = f"model.layers.{i}"
        groups += [[f"{pre}.self_attn.{x}_proj" for x in "qkv"], [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"]]
    stacked = stack_groups_(model, groups)
    return {"layers": len(names), "min": min(per_layer), "max": max(per_layer),
            "mean": sum(per_layer) / len(per_layer), "stacked_groups": stacked,
            "plain_dense_layers": sum(p_ == 0 for p_ in per_layer) if plain_dense else 0}


def load_ckpt_row(label: str, ckpt: str, device) -> tuple:
    """A lowered checkpoint as patchc.load gives it ("patch"), or its dense twin ("dense-inductor": every
    HybridLinear densified to an nn.Linear holding W * M): (model, per-layer sparsity info)."""
    from patchc.lower import load, read_manifest
    from patchc.speed import densify_

    model = load(ckpt, device=device)
    if label.startswith("dense"):
        densify_(model)
        return model.eval(), {}
    per_layer = [x["sparsity"] for x in read_manifest(ckpt)["layers"]]
    return model.eval(), {"layers": len(per_layer), "min": min(per_layer), "max": max(per_layer),
                          "mean": sum(per_layer) / len(per_layer), "checkpoint": str(ckpt)}


def run_row(label: str, a, shape: dict, ids, dtype, mode) -> dict:
    """Build the model of one row (dense or hybrid at a sparsity, or a lowered checkpoint / its dense twin with
    --ckpt), time generate(), measure memory."""
    cuda = str(a.device).startswith("cuda")
    torch._dynamo.reset()
    start_gb = torch.cuda.memory_allocated() / 1e9 if cuda else 0.0
    info = {}
    backend = "inductor"
    if a.ckpt:
        model, info = load_ckpt_row(label, a.ckpt, a.device)
        backend = "inductor" if label.startswith("dense") else "patch"
    else:
        model = build(shape, a.device, dtype)
    if label.startswith("patch") and not a.ckpt:
        import patchc  # noqa: F401  (registers the backend)

        info = hybridize_(model, float(label.split("-")[1]), a.tile, plain_dense=not a.no_plain_dense)
        backend = "patch"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        weights_gb = torch.cuda.memory_allocated() / 1e9 - start_gb
    if a.compile == "hf":  # generate()'s own compile of the decode step (static cache, CUDA graphs)
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig(backend=backend, mode=mode or "default")
    else:
        compiled = torch.compile(model.forward, backend=backend, mode=mode)

        def forward(*args, _compiled=compiled, **kwargs):
            if mode == "reduce-overhead":  # generate() keeps reading the static cache the last replay wrote
                torch.compiler.cudagraph_mark_step_begin()
            return _compiled(*args, **kwargs)
        model.forward = forward
    r = {"row": label, **time_generate(model, ids, a.new, a.device, disable_compile=a.compile != "hf"),
         "per_layer_sparsity": info}
    if cuda:
        r["weights_GB"] = round(weights_gb, 2)         # the model as loaded (weights, packed or dense)
        r["peak_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9 - start_gb, 2)  # generate()'s peak
        r["leftover_at_start_GB"] = round(start_gb, 2)  # memory an earlier row left allocated (in-process runs)
    return r


def model_args(ap: argparse.ArgumentParser) -> None:
    """The arguments the end-to-end scripts share: where results go, which model, which batch of prompts."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shape (tests)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)


def main() -> None:
    ap = argparse.ArgumentParser()
    model_args(ap)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--sparsities", default=None, help="random hybrid rows (default 0,0.25,0.35,0.45; not with --ckpt)")
    ap.add_argument("--ckpt", default=None,
                    help="a `patchc lower` checkpoint: rows `patch` (loaded with patchc.load) and `dense-inductor` (its "
                         "densified twin) instead of random weights hybridised in place; --quick/--tile/--no-plain-dense "
                         "do not apply")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--no-plain-dense", action="store_true",
                    help="keep layers with no 2:4 tile packed, on the hybrid kernels (default: plain F.linear)")
    ap.add_argument("--compile", choices=["hf", "manual"], default="hf",
                    help="hf: generate() compiles its decode step with our backend (CompileConfig); "
                         "manual: torch.compile(model.forward)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds (rows resume)")
    ap.add_argument("--in-process", action="store_true", help="on CUDA, run every row in this process (default: "
                    "one child process a row, so that peak memory is the row's own)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rows alternate this many times (dense, patch-0, ..., dense, ...); medians and ranges over them")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # a child process runs this one row
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)  # ... as this repeat
    a = ap.parse_args()
    shape = QUICK if a.quick else SEVEN_B
    if a.quick:
        a.batch, a.prompt, a.new, a.tile = 2, 16, 6, 64
    if a.ckpt:
        from transformers import AutoConfig

        from patchc.lower import read_manifest

        if a.sparsities is not None:
            ap.error("--sparsities makes random hybrid rows; with --ckpt the checkpoint's own sparsity is measured")
        read_manifest(a.ckpt)                        # a clear error for what is not a packed checkpoint, before any work
        c = AutoConfig.from_pretrained(a.ckpt)
        shape = dict(layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
                     heads=c.num_attention_heads, vocab=c.vocab_size, checkpoint=str(a.ckpt))
    sparsities = a.sparsities or "0,0.25,0.35,0.45"
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    mode = "reduce-overhead" if a.device.startswith("cuda") else None
    torch.manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (a.batch, a.prompt), device=a.device)
    out = Path(a.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    labels = ["dense-inductor"] + (["patch"] if a.ckpt else [f"patch-{s}" for s in sparsities.split(",")])
    runs = [(rep, label) for rep in range(a.repeats) for label in labels] if a.row is None else [(a.rep, a.row)]
    for rep, label in runs:
        dest = out / "rows" / f"{label}.{rep}.json"
        if dest.is_file():  # rows are written one by one: a run cut short continues here
            continue
        if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
            print(f"budget spent, stopping before {label} (repeat {rep})", flush=True)
            break
        if a.row is None and a.device.startswith("cuda") and not a.in_process:
            # one process a row: what one model costs, with nothing left over from the row before (compiled
            # graphs and CUDA-graph pools of an earlier model outlive torch._dynamo.reset() in one process)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", label, "--rep", str(rep)], check=True)
            continue
        r = {**run_row(label, a, shape, ids, dtype, mode), "repeat": rep}
        dest.write_text(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    if a.row is not None:
        return
    runs_by_label = {x: [json.loads(f.read_text()) for f in sorted((out / "rows").glob(f"{x}.*.json"))] for x in labels}
    rows = [summarize(x, rs) for x, rs in runs_by_label.items() if rs]
    dense = next((r for r in rows if r["row"] == "dense-inductor"), None)
    for r in rows:
        if dense:
            r["speedup_vs_dense"] = round(r["tokens_per_s"]["median"] / dense["tokens_per_s"]["median"], 3)
    env = {**machine_env(a.device, repeats=a.repeats), "shape": shape, "batch": a.batch, "prompt": a.prompt,
           "new": a.new, "tile": a.tile, "mode": mode, "compile": a.compile}
    rng = lambda k: lambda r: f"{r[k]['median']} ({r[k]['min']}-{r[k]['max']})"  # noqa: E731
    cols = [("row", "row"), ("repeats", "repeats"), ("tokens/s", rng("tokens_per_s")),
            ("decode ms/token", rng("decode_ms_per_token")), ("prefill ms", rng("prefill_ms")),
            ("first call s", rng("first_call_s")), ("speedup vs dense (medians)", "speedup_vs_dense"),
            ("weights GB", "weights_GB"), ("peak GB", "peak_mem_GB")]
    print(write_report(out, "e2e", f"End to end ({env['device']}, torch {env['torch']}, batch {a.batch}, "
                       f"{a.prompt}+{a.new} tokens)", cols, rows, env,
                       note="median (min-max) over the repeats; rows alternate, one process a row on CUDA"))


def summarize(label: str, runs: list[dict]) -> dict:
    """One row: median / min / max of each timing over its repeats, memory of the last repeat."""
    out = {"row": label, "repeats": len(runs), "runs": runs,
           "per_layer_sparsity": runs[-1].get("per_layer_sparsity", {})}
    for key, src in (("tokens_per_s", "new_tokens_per_s"), ("decode_ms_per_token", "decode_ms_per_token"),
                     ("prefill_ms", "prefill_ms"), ("total_ms", "total_ms"), ("first_call_s", "first_call_s")):
        out[key] = stats([r[src] for r in runs], 3)
    for key in ("weights_GB", "peak_mem_GB"):
        out[key] = runs[-1].get(key, "")
    return out


if __name__ == "__main__":
    main()
