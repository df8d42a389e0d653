"""`patchc inspect`: per-layer shape, dense tiles, sparsity and bytes of a packed checkpoint; tile maps."""
from __future__ import annotations

import math
import os
from pathlib import Path

from patchc.lower import PACKED_FILE, read_manifest


def _entries(manifest: dict) -> list[tuple[str, dict]]:
    """(display name, entry) of every packed weight: hybrid layers, then fused MoE expert weights."""
    return ([(l["module"], l) for l in manifest["layers"]]
            + [(f"{e['name']} (experts)", e) for e in manifest.get("experts", [])])


def table(manifest: dict) -> str:
    rows = [("layer", "shape", "dense tiles", "sparsity", "MB", "vs dense")]
    entries = _entries(manifest)
    for name, l in entries:
        rows.append((name, "x".join(map(str, l["shape"])), f"{l['dense_tiles']}/{l['tiles']}",
                     f"{l['sparsity']:.3f}", f"{l['bytes'] / 1e6:.3f}", f"{l['bytes'] / l['dense_bytes']:.3f}"))
    b = manifest["bytes"]
    n_dense = sum(l["dense_tiles"] for _, l in entries)
    n_tiles = sum(l["tiles"] for _, l in entries)
    n_exp = len(manifest.get("experts", []))
    what = f"{len(manifest['layers'])} layers" + (f" + {n_exp} experts" if n_exp else "")
    rows.append(("TOTAL", what, f"{n_dense}/{n_tiles}",
                 f"{manifest['sparsity']['achieved']:.4f}", f"{b['hybrid_packed'] / 1e6:.3f}", f"{b['ratio']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    plain = sum(l["dense_tiles"] == l["tiles"] for l in manifest["layers"])
    if plain:
        lines.append(f"{plain} of {len(manifest['layers'])} layers have no 2:4 tile: patchc.load runs them as plain dense "
                     "linears (plain_dense=False keeps them on the hybrid kernels)")
    if n_exp:
        lines.append(f"{n_exp} fused MoE expert weights are masked and stored packed; patchc.load decompresses them "
                     "to dense zero-filled weights (exactly W * M; no expert speedup)")
    cov = manifest["sparsity"].get("coverage")
    if cov:
        lines.append(f"coverage: {cov['coverage']:.1%} of the model's matmul parameters are masked "
                     f"({cov['masked_params']:,} of {cov['matmul_params']:,}, "
                     f"{cov.get('masked_expert_params', 0):,} of them in MoE experts; the sparsity above is over them)")
        if cov.get("unmasked_expert_params"):
            lines.append(f"warning: {cov['unmasked_expert_params']:,} MoE expert parameters are not pruned")
        elif cov["coverage"] < 0.5:
            lines.append("warning: most matmul parameters are not pruned")
    head = (f"{manifest['model']['spec']} ({manifest['model']['architecture']}), tile {manifest['tile']}, "
            f"{manifest['dtype']}, format {manifest['format']} v{manifest['version']}")
    return head + "\n" + "\n".join(lines)


def plot(path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """One small panel per layer: dense tiles dark, 2:4 tiles light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors import safe_open

    from patchc.io import atomic_path

    manifest = read_manifest(path)
    layers = _entries(manifest)
    cols = min(len(layers), 7 if len(layers) % 7 == 0 else 8)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6 + 0.6), squeeze=False)
    with safe_open(str(Path(path) / PACKED_FILE), framework="pt") as f:
        for ax, (_, l) in zip(axes.flat, layers):
            bm = f.get_tensor(f"{l.get('module', l['name'])}.bitmap").float().numpy()
            ax.imshow(bm, cmap="Blues", vmin=-0.15, vmax=1.0, interpolation="nearest", aspect="equal")
            short = ".".join(p for p in l.get("module", l["name"]).split(".")
                             if p not in ("model", "transformer", "layers", "h"))
            ax.set_title(f"{short}\n{l['sparsity']:.2f}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"{manifest['model']['spec']}: dense tiles (dark) vs 2:4 (light), global sparsity "
                 f"{manifest['sparsity']['achieved']:.3f}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
