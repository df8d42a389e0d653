"""The `patch` backend's FX pass: hybrid_linear nodes -> hybrid_mm nodes carrying a per-layer schedule.

Dynamo hands the backend the model's buffers as placeholders with their real tensors in
example_inputs. For each `patchc::hybrid_linear` node the pass reads the layer's bitmap, builds its
schedule (codegen.schedule) into the runtime's registry under a content hash of the bitmap, and
rewrites the node to `patchc::hybrid_mm` naming that key, whose CUDA implementation runs the kernel generated for
that layer. Layers reading one input whose packed tiles patchc.load stored in one allocation (q/k/v,
gate/up) become one hybrid_mm over that storage (the stacked schedule is the concatenation), each
layer's output a slice of it: one launch, more programs for small layers. Where the graph then computes
SiLU(gate) * up from the two slices (LLaMA-style MLPs), that becomes one hybrid_mm_silu_mul: the epilogue
runs in the kernel and the [gate; up] output is never written. A layer that cannot run the kernel keeps
the reference op, with one warning naming it.
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch

from patchc.runtime import kernel_unsupported, schedule_for


@dataclass
class SwapReport:
    swapped: list[str] = field(default_factory=list)                 # layer keys now on generated kernels
    reference: dict[str, str] = field(default_factory=dict)          # layer -> why it runs the reference op
    shared_input_groups: list[list[str]] = field(default_factory=list)
    stacked: list[list[str]] = field(default_factory=list)           # groups run as one launch
    fused_silu_mul: list[list[str]] = field(default_factory=list)    # [gate, up] run as SiLU(gate) * up, one launch
    seconds: float = 0.0                                             # time the pass took


def _real(node: torch.fx.Node, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if node.op == "placeholder":
        return inputs.get(node.name)
    if node.op == "get_attr":
        return getattr(node.graph.owning_module, node.target, None)
    return None


_ACCESS = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.?([A-Za-z_]\w*)")
_MODULE_INTERNALS = {"_modules", "_buffers", "_parameters"}


def source_path(name: str) -> str:
    """The module path in a dynamo source name, whatever the root's spelling:
      L['self']._modules['model']._modules['layers']._modules['0']...   (transformers <= 5.23)
      L['args'][0]._modules['model']._modules['layers']._modules['0']... (5.24+: the forward is wrapped)
      L['self'].model.layers[0].mlp...  G['model']...  (attribute / global forms)
    -> model.layers.0.mlp... (the final leaf, e.g. the buffer name, included)."""
    toks = [key or idx or attr for key, idx, attr in _ACCESS.findall(name)]
    if toks and toks[0] in ("L", "G"):                     # the frame's locals / globals
        toks = toks[1:]
        if toks[:1] in (["args"], ["kwargs"]) and len(toks) > 1:
            toks = toks[2:]                                # args[0] / kwargs['model']: the module itself
        else:
            toks = toks[1:]                                # 'self', or the global variable's name
    return ".".join(t for t in toks if t not in _MODULE_INTERNALS)


def _layer_name(node: torch.fx.Node) -> str:
    """The module path of the layer, from dynamo's source of its bitmap buffer (see source_path)."""
    bitmap = node.args[1]
    src = bitmap.meta.get("grapharg") if isinstance(bitmap, torch.fx.Node) else None
    name = getattr(getattr(src, "source", None), "name", None)
    name = str(name() if callable(name) else name or bitmap)
    path = source_path(name)
    head, _, leaf = path.rpartition(".")
    return head if leaf == "bitmap" and head else (path or name)


def _stackable(infos: list[dict]) -> bool:
    """Members whose packed tiles are consecutive views of one allocation per field (patchc.load arranges
    that for q/k/v and gate/up), with one tile size, input size and bias-ness."""
    a = infos[0]
    if any((i["tile"], i["k"], i["bias"] is None) != (a["tile"], a["k"], a["bias"] is None) for i in infos):
        return False
    for f in ("dense", "values", "meta"):
        ts = [i[f] for i in infos]
        if any(t is None or not t.is_contiguous() for t in ts):
            return False
        if len({t.untyped_storage().data_ptr() for t in ts}) != 1:
            return False
        if any(t.storage_offset() + t.numel() != u.storage_offset() for t, u in zip(ts, ts[1:])):
            return False
    return True


_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _fuse_silu_mul(gm: torch.fx.GraphModule, y: torch.fx.Node, parts: list[torch.fx.Node], names: list[str],
                   report: SwapReport) -> None:
    """y = hybrid_mm([gate; up]) whose only use is SiLU(y[..., :n]) * y[..., n:] (a LLaMA-style MLP) becomes
    one hybrid_mm_silu_mul: the epilogue runs in the kernel, and y is never written."""
    if len(parts) != 2 or len(y.users) != 2 or parts[0].args[3] - parts[0].args[2] != parts[1].args[3] - parts[1].args[2]:
        return
    gate, up = parts
    if len(gate.users) != 1 or len(up.users) != 1:
        return
    act = next(iter(gate.users))
    if act.target not in _SILU or act.kwargs.get("inplace") or len(act.users) != 1:
        return
    mul = next(iter(act.users))
    if mul.target not in _MUL or mul.kwargs or set(mul.args) != {act, up} or len(mul.args) != 2:
        return
    with gm.graph.inserting_before(mul):
        fused = gm.graph.call_function(torch.ops.patchc.hybrid_mm_silu_mul.default, y.args)
    fused.meta.update(mul.meta)
    mul.replace_all_uses_with(fused)
    for node in (mul, act, gate, up, y):
        gm.graph.erase_node(node)
    report.fused_silu_mul.append(names)


def _stack(gm: torch.fx.GraphModule, infos: list[dict], report: SwapReport) -> None:
    """One hybrid_mm over the group's shared storage, each member's output a slice of it. The stacked tiles
    are an as_strided view of the first member's buffer over the whole allocation (no copy); the bitmaps
    (and biases) are concatenated in the graph (a few hundred bytes)."""
    first = infos[0]
    node0 = first["node"]
    bitmap = torch.cat([i["bitmap"] for i in infos])                  # [sum R_i, C]
    sched = schedule_for(bitmap, first["tile"])
    arg = lambda i, pos: i["node"].args[pos]  # noqa: E731  (x, bitmap, dense, values, meta, bias, ...)
    with gm.graph.inserting_before(node0):
        views = {}
        for pos, f in ((2, "dense"), (3, "values"), (4, "meta")):
            t0 = first[f]
            rows = sum(i[f].shape[0] for i in infos)
            views[f] = gm.graph.call_function(torch.ops.aten.as_strided.default, (
                arg(first, pos), [rows, *t0.shape[1:]], list(t0.stride()), t0.storage_offset()))
        bm = gm.graph.call_function(torch.ops.aten.cat.default, ([arg(i, 1) for i in infos],))
        bias = None
        if first["bias"] is not None:
            bias = gm.graph.call_function(torch.ops.aten.cat.default, ([arg(i, 5) for i in infos],))
        y = gm.graph.call_function(torch.ops.patchc.hybrid_mm.default, (
            node0.args[0], bm, views["dense"], views["values"], views["meta"], bias, sum(i["n"] for i in infos),
            first["k"], first["tile"], sched.key))
    start = 0
    parts = []
    for i in infos:
        with gm.graph.inserting_after(y):
            part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (y, -1, start, start + i["n"]))
        part.meta.update(i["node"].meta)
        i["node"].replace_all_uses_with(part)
        gm.graph.erase_node(i["node"])
        start += i["n"]
        parts.append(part)
        report.swapped.append(i["name"])
    report.stacked.append([i["name"] for i in infos])
    _fuse_silu_mul(gm, y, parts, [i["name"] for i in infos], report)


def swap_hybrid_linears(gm: torch.fx.GraphModule, example_inputs: list) -> SwapReport:
    report = SwapReport()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n.name: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
    targets = (torch.ops.patchc.hybrid_linear, torch.ops.patchc.hybrid_linear.default)  # dynamo emits the packet
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    g = nx.DiGraph()
    by_input: dict[str, list[dict]] = {}
    real = lambda n: _real(n, inputs) if isinstance(n, torch.fx.Node) else None  # noqa: E731
    for node in nodes:
        x, bitmap_n, dense_n, values_n, meta_n, bias_n, n_out, k_in, tile = node.args
        name = _layer_name(node)
        g.add_edge(x.name, name)
        bitmap = _real(bitmap_n, inputs)
        if bitmap is None:
            report.reference[name] = "its bitmap is not a constant of the graph"
        elif kernel_unsupported(tile):
            report.reference[name] = kernel_unsupported(tile)
        if name in report.reference:
            continue
        by_input.setdefault(x.name, []).append(
            {"node": node, "name": name, "bitmap": bitmap, "dense": real(dense_n), "values": real(values_n),
             "meta": real(meta_n), "bias": real(bias_n), "n": n_out, "k": k_in, "tile": tile})
    for infos in by_input.values():
        if len(infos) > 1 and _stackable(infos):
            _stack(gm, infos, report)
            continue
        for i in infos:
            node = i["node"]
            sched = schedule_for(i["bitmap"], i["tile"])  # built now, from the real bitmap: never at run time
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.patchc.hybrid_mm.default, (*node.args, sched.key))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            report.swapped.append(i["name"])
    report.shared_input_groups = [sorted(g.successors(x)) for x in g.nodes if g.out_degree(x) > 1]
    for name, why in report.reference.items():
        warnings.warn(f"patch backend: {name} runs the reference path: {why}", stacklevel=2)
    gm.graph.lint()
    gm.recompile()
    return report
