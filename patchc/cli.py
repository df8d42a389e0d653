"""The `patchc` command line: prune, eval, lower, inspect, bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


HELP = argparse.ArgumentDefaultsHelpFormatter   # every option's help shows its default


def _device(name: str) -> str:
    from patchc.models import resolve_device

    return resolve_device(name)


def _dtype_for(device: str, name: str):
    from patchc.models import resolve_dtype

    return resolve_dtype(name, device)


def _floats(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END (two numbers), got {text!r}") from None
    return a, b


def add_prune(sub) -> None:
    from patchc.train import METHODS, PruneConfig

    d = PruneConfig()
    p = sub.add_parser("prune", formatter_class=HELP, help="learn hybrid dense/2:4 tile masks on frozen weights",
                       description="Learn which tiles of every linear stay dense and which become 2:4, "
                                   "then extract them at an exact global sparsity.")
    p.add_argument("model", help="tiny:<arch>, smollm2-135m, a .gguf file, a HF folder or a hub id")
    p.add_argument("--sparsity", type=float, default=None, help="global target in [0, 0.5] (0.5 = all 2:4)")
    p.add_argument("--mode", choices=["tile", "joint"], default=d.mode,
                   help="tile: fixed one-shot 2:4 pattern; joint: 2:4 pattern learned too")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="patch: learn; hybrid: one-shot tile choice, no training; "
                        "magnitude/wanda/sparsegpt: one-shot 2:4 everywhere (sparsity 0.5)")
    p.add_argument("--prior", dest="oneshot", choices=["magnitude", "wanda", "sparsegpt"], default=d.oneshot,
                   help="one-shot method giving the 2:4 pattern (fixed in tile mode, the prior in joint mode)")
    p.add_argument("--data", nargs="+", required=True, help="text/jsonl files or folders of them")
    p.add_argument("--out", required=True, help="output folder (prune.json, masks.safetensors, log, checkpoint)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens a training sequence (0 = auto: 2048, or the model's positions if fewer)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences a step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches accumulated a step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the mask logits (cosine)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps")
    p.add_argument("--sparse-reg", type=float, default=d.sparse_reg, help="weight of |density - target|")
    p.add_argument("--weight-reg", type=float, default=d.weight_reg, help="weight of the kept-weight-norm term")
    p.add_argument("--distill", type=float, default=d.distill, help="weight of KL(dense || masked) on the logits; the dense model is the same graph with masks off (0 = off)")
    p.add_argument("--tau", type=_floats, default=d.tau, help="Gumbel temperature START,END")
    p.add_argument("--scale-tile", type=_floats, default=d.scale_tile, help="tile logit scale START,END")
    p.add_argument("--scale-24", type=_floats, default=d.scale_24, help="2:4 logit scale START,END")
    p.add_argument("--prior-strength", type=float, default=d.prior_strength, help="one-shot prior added to the initial logits, in logit std units")
    p.add_argument("--tile-size", type=int, default=d.tile_size, help="0 = auto (largest of 128/64/32/16 that fits)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help="sequences for one-shot statistics")
    p.add_argument("--holdout", type=int, default=d.holdout,
                   help="hold N windows of --data out of training and report their PPL (prune.json ppl_holdout; "
                        "with --eval-every, log.jsonl): a validation set for tuning that is not an evaluation set")
    p.add_argument("--include", nargs="*", default=[], help="regexes: mask only matching weight names")
    p.add_argument("--exclude", nargs="*", default=[], help="regexes: keep matching weights dense")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (noise, data order, tiny models)")
    p.add_argument("--device", default="auto", help="cuda | cpu | cuda:N (auto: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--eval-ppl", default=None, help="text file: report PPL of the one-shot start and the result")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="PPL window length")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate the exactly extracted masks every N steps (PPL in log.jsonl: the learning curve)")
    p.add_argument("--state", choices=["lean", "fp32"], default=d.state,
                   help="mask-logit + optimizer state: lean = bf16 logits and 8-bit moments (6 bytes per masked weight "
                        "in joint mode), fp32 = fp32 logits and Adam moments (18 bytes)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the training step from CUDA graphs (one GPU process, mask kernels on): the same "
                        "computation without the host overhead that bounds small models' steps "
                        "(also PATCHC_CUDA_GRAPHS=1)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the resumable checkpoint/ folder after the run completes (removed otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prune)


def run_prune(a) -> int:
    from patchc.train import PruneConfig, prune

    sparsity = a.sparsity
    if sparsity is None:
        if a.method in ("magnitude", "wanda", "sparsegpt"):
            sparsity = 0.5
        else:
            raise ValueError("--sparsity is required (a global target in [0, 0.5], e.g. 0.35)")
    cfg = PruneConfig(sparsity=sparsity, mode=a.mode, method=a.method, oneshot=a.oneshot, tile_size=a.tile_size,
                      steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                      warmup=a.warmup, sparse_reg=a.sparse_reg, weight_reg=a.weight_reg, distill=a.distill,
                      tau=tuple(a.tau), scale_tile=tuple(a.scale_tile), scale_24=tuple(a.scale_24),
                      prior_strength=a.prior_strength, calib_samples=a.calib_samples, holdout=a.holdout, seed=a.seed,
                      include=tuple(a.include), exclude=tuple(a.exclude), state=a.state,
                      cuda_graphs=a.cuda_graphs)
    device = _device(a.device)
    res = prune(a.model, a.data, a.out, cfg, device=device, dtype=_dtype_for(device, a.dtype), resume=a.resume,
                overwrite=a.overwrite, eval_ppl=a.eval_ppl, eval_seq_len=a.eval_seq_len,
                eval_windows=a.eval_windows, save_every=a.save_every, eval_every=a.eval_every,
                keep_checkpoint=a.keep_checkpoint, progress=not a.quiet)
    s = res.report["sparsity"]
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return 0
    print(f"sparsity {s['achieved']:.4f} (target {s['target']}, one tile = {s['one_tile']:.4f}); "
          f"{len(res.report['layers'])} layers masked, {len(res.report['skipped'])} kept dense -> {res.out_dir}")
    if "ppl_holdout" in res.report:
        h = res.report["ppl_holdout"]
        print("held-out PPL: " + ", ".join(f"{k} {h[k]['ppl']:.3f}" for k in ("dense", "init", "final") if h.get(k)))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", formatter_class=HELP, help="perplexity / zero-shot accuracy of a model, a prune folder or a lowered checkpoint")
    p.add_argument("model", help="model spec (see prune), a `patchc prune` folder (hard masks applied) or a "
                                 "`patchc lower` checkpoint (loaded with patchc.load)")
    p.add_argument("--ppl", default=None, help="text file, evaluated as-is in non-overlapping windows")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default 2048, or the model's positions if fewer)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (None: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows a forward")
    p.add_argument("--zeroshot", default=None, help="folder of TASK.jsonl files (../shared/assets/data/zeroshot): "
                                                     "piqa, arc_easy, winogrande, lambada_openai scored as lm-eval does")
    p.add_argument("--tasks", default="piqa,arc_easy,winogrande,lambada_openai", help="zero-shot tasks, comma-separated")
    p.add_argument("--limit", type=int, default=None, help="first N items of each zero-shot task")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu (a lowered checkpoint keeps its own)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=run_eval)


def _eval_model(spec: str, device: str, dtype):
    """(model, tokenizer) for a spec, a prune folder (hard masks applied) or a lowered checkpoint."""
    from patchc.models import load_model
    from patchc.prune_dir import apply_hard_masks_, read_prune_dir

    d = Path(spec)
    if (d / "manifest.json").is_file():
        from transformers import AutoTokenizer

        from patchc.lower import load

        return load(d, device=device), AutoTokenizer.from_pretrained(d)
    if (d / "prune.json").is_file():
        from patchc.fingerprint import load_recorded_model

        masks = read_prune_dir(d)
        # the recorded absolute source, fingerprint checked: never a same-shaped model found relative to the cwd
        loaded = load_recorded_model(masks.report, device=device, dtype=dtype, where=str(d / "prune.json"))
        apply_hard_masks_(loaded.model, masks)
        return loaded.model, loaded.tokenizer
    loaded = load_model(spec, device=device, dtype=dtype)
    return loaded.model, loaded.tokenizer


def run_eval(a) -> int:
    from patchc.evaluate import hf_logits_fn, perplexity_of_file
    from patchc.io import write_json

    from patchc.preflight import check_eval

    if not a.ppl and not a.zeroshot:
        raise SystemExit("patchc eval: nothing to evaluate: pass --ppl FILE and/or --zeroshot DIR")
    device = _device(a.device)
    positions = check_eval(a.model, device=device, ppl=a.ppl, zeroshot=a.zeroshot, seq_len=a.seq_len, out_json=a.json)
    if a.seq_len is None:
        a.seq_len = min(2048, positions or 2048)
    model, tok = _eval_model(a.model, device, _dtype_for(device, a.dtype))
    result = {"model": a.model}
    if a.ppl:
        r = perplexity_of_file(hf_logits_fn(model), tok, a.ppl, seq_len=a.seq_len, batch_size=a.batch_size,
                               max_windows=a.max_windows, device=device)
        print(f"PPL {r['ppl']:.4f}  ({r['windows']} windows of {r['seq_len']} tokens, {Path(a.ppl).name})")
        result.update(r)
    if a.zeroshot:
        from patchc.zeroshot import evaluate_zeroshot

        tasks = [t for t in a.tasks.split(",") if t]
        z = evaluate_zeroshot(hf_logits_fn(model), tok, a.zeroshot, tasks=tasks, limit=a.limit, device=device,
                              max_length=min(2048, getattr(model.config, "max_position_embeddings", 2048)))
        for t in tasks:
            extra = "".join(f"  {k} {z[t][k]:.4f}" for k in ("acc_norm", "ppl") if k in z[t])
            print(f"{t:<15} acc {z[t]['acc']:.4f}{extra}  ({z[t]['n']} items)")
        print(f"average acc {z['average_acc']:.4f}")
        result["zeroshot"] = z
    if a.json:
        write_json(a.json, result)
    return 0


def add_lower(sub) -> None:
    p = sub.add_parser("lower", formatter_class=HELP, help="freeze a prune run into a packed (or dense-zeroed) checkpoint")
    p.add_argument("prune_dir", help="output folder of `patchc prune`")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--format", choices=["packed", "dense"], default="packed",
                   help="packed: patchc's hybrid format; dense: plain HF checkpoint, pruned weights zeroed")
    p.add_argument("--dtype", default="auto", help="weight dtype (auto: the prune run's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_lower)


def run_lower(a) -> int:
    from patchc.lower import lower
    from patchc.models import parse_dtype

    dtype = None if a.dtype == "auto" else parse_dtype(a.dtype)
    m = lower(a.prune_dir, a.out, fmt=a.format, dtype=dtype, overwrite=a.overwrite)
    if a.format == "packed":
        b = m["bytes"]
        print(f"{len(m['layers'])} hybrid layers, sparsity {m['sparsity']['achieved']:.4f}: "
              f"{b['hybrid_packed'] / 1e6:.2f} MB packed vs {b['hybrid_dense'] / 1e6:.2f} MB dense "
              f"(ratio {b['ratio']:.3f}) -> {a.out}")
    else:
        print(f"dense checkpoint with pruned weights zeroed (sparsity {m['sparsity']['achieved']:.4f}) -> {a.out}")
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", formatter_class=HELP, help="per-layer tiles, sparsity and bytes of a packed checkpoint")
    p.add_argument("dir", help="output folder of `patchc lower`")
    p.add_argument("--plot", default=None, help="also draw every layer's tile map to this PNG")
    p.add_argument("--verify", action="store_true", help="also check every tensor's checksum")
    p.set_defaults(func=run_inspect)


def run_inspect(a) -> int:
    from patchc.inspect import plot, table
    from patchc.lower import read_manifest, verify

    m = verify(a.dir) if a.verify else read_manifest(a.dir)
    if a.verify:
        print("checksums OK")
    print(table(m))
    if a.plot:
        plot(a.dir, a.plot)
        print(f"tile maps -> {a.plot}")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", formatter_class=HELP, help="generation speed of a packed checkpoint against its dense twin, here")
    p.add_argument("dir", help="output folder of `patchc lower` (packed)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=16, help="sequences generated together")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens a sequence")
    p.add_argument("--new", type=int, default=128, help="new tokens a sequence")
    p.add_argument("--no-compile", action="store_true",
                   help="eager generate() (without it, on CUDA generate() compiles its decode step with CUDA graphs)")
    p.add_argument("--dense-modes", default="auto",
                   help="inductor modes of the dense twin's rows, comma-separated (reduce-overhead, max-autotune, "
                        "default, max-autotune-no-cudagraphs); auto: reduce-overhead,max-autotune when compiled (CUDA), "
                        "reduce-overhead alone otherwise. Speedups are against the best dense row")
    p.add_argument("--repeats", type=int, default=1,
                   help="rows alternate this many times (patch, dense, dense-max-autotune, patch, ...), medians and "
                        "ranges over them; > 1 keeps the packed model and the dense twin in memory together")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.set_defaults(func=run_bench)


def run_bench(a) -> int:
    from patchc.speed import BenchConfig, bench

    from patchc.preflight import check_bench

    device = _device(a.device)
    modes = None if a.dense_modes == "auto" else tuple(m.strip() for m in a.dense_modes.split(",") if m.strip())
    cfg = BenchConfig(batch=a.batch, prompt=a.prompt, new=a.new, compile=False if a.no_compile else None,
                      dense_modes=modes, repeats=a.repeats)          # checked before anything is loaded
    check_bench(a.dir, device=device, out_json=a.json)
    r = bench(a.dir, cfg, device=device, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    rng = lambda row, k: (f"{row[k]}" if row["repeats"] == 1 else  # noqa: E731
                          f"{row[k]} ({row['stats'][k]['min']}-{row['stats'][k]['max']})")
    print(f"{'':20} {'tokens/s':>24} {'decode ms/token':>22} {'prefill ms':>20} {'weights GB':>11} {'first call s':>13}")
    for row in r["rows"]:
        print(f"{row['row']:20} {rng(row, 'new_tokens_per_s'):>24} {rng(row, 'decode_ms_per_token'):>22} "
              f"{rng(row, 'prefill_ms'):>20} {row['weights_GB']:>11} {row['first_call_s']:>13}")
    print(f"packed / best dense ({r['best_dense']}): {r['speedup_tokens_per_s']}x tokens/s, {r['speedup_decode']}x "
          f"decode, {r['weights_ratio']}x weight memory ({device}, batch {a.batch}, {a.prompt} + {a.new} tokens"
          f"{f', medians of {a.repeats} alternated repeats' if a.repeats > 1 else ''}); "
          f"greedy tokens alike before the first difference: {r['greedy_agreement']:.1%}")
    if device == "cpu":
        print("(on the CPU both run the reference path: the numbers say nothing about GPU speed)")
    if a.json:
        from patchc.io import write_json

        write_json(a.json, r)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchc", description="learnable tile-level hybrid sparsity for LLMs",
                                formatter_class=HELP)
    sub = p.add_subparsers(dest="command", required=True)
    add_prune(sub)
    add_eval(sub)
    add_lower(sub)
    add_inspect(sub)
    add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    if not logging.getLogger("patchc").handlers:   # "model SPEC -> FILE (...)" and other notes, on stderr
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("patchc: %(message)s"))
        logging.getLogger("patchc").addHandler(h)
        logging.getLogger("patchc").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
        print(f"patchc {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
