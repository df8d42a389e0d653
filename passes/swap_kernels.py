"""The `patch` backend's FX pass: hybrid_linear nodes -> hybrid_mm nodes carrying a per-layer schedule.

Dynamo hands the backend the model's buffers as placeholders with their real tensors in
example_inputs. For each `patchc::hybrid_linear` node the pass reads the layer's bitmap, builds its
schedule (codegen.schedule) into the runtime's registry under a content hash of the bitmap, and
rewrites the node to `patchc::hybrid_mm` naming that key, whose CUDA implementation runs the kernel generated for
that layer. A layer that cannot run the kernel keeps the reference op, with one warning naming it.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch

from patchc.runtime import schedule_for

MIN_KERNEL_TILE = 16  # tl.dot needs K >= 16


@dataclass
class SwapReport:
    swapped: list[str] = field(default_factory=list)                 # layer keys now on generated kernels
    reference: dict[str, str] = field(default_factory=dict)          # layer -> why it runs the reference op
    shared_input_groups: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0                                             # time the pass took


def _real(node: torch.fx.Node, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if node.op == "placeholder":
        return inputs.get(node.name)
    if node.op == "get_attr":
        return getattr(node.graph.owning_module, node.target, None)
    return None


def _layer_name(node: torch.fx.Node) -> str:
    """The module path of the layer, from dynamo's source of its bitmap buffer
    (e.g. L['self']._modules['model']..._modules['q_proj']._buffers['bitmap'] -> model....q_proj)."""
    bitmap = node.args[1]
    src = bitmap.meta.get("grapharg") if isinstance(bitmap, torch.fx.Node) else None
    name = getattr(getattr(src, "source", None), "name", None)
    name = str(name() if callable(name) else name or bitmap)
    parts = re.findall(r"\['([^']+)'\]", name)
    return ".".join(p for p in parts if p not in ("self", "bitmap")) or name


def swap_hybrid_linears(gm: torch.fx.GraphModule, example_inputs: list) -> SwapReport:
    report = SwapReport()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n.name: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
    targets = (torch.ops.patchc.hybrid_linear, torch.ops.patchc.hybrid_linear.default)  # dynamo emits the packet
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    g = nx.DiGraph()
    for node in nodes:
        x, bitmap_n, dense_n, values_n, meta_n, bias_n, n_out, k_in, tile = node.args
        name = _layer_name(node)
        g.add_edge(x.name, name)
        bitmap = _real(bitmap_n, inputs)
        if bitmap is None:
            report.reference[name] = "its bitmap is not a constant of the graph"
        elif tile < MIN_KERNEL_TILE:
            report.reference[name] = f"tile {tile} < {MIN_KERNEL_TILE} (tl.dot's minimum K)"
        if name in report.reference:
            continue
        sched = schedule_for(bitmap, tile)  # built now, from the real bitmap: never at run time
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.patchc.hybrid_mm.default, (
                x, bitmap_n, dense_n, values_n, meta_n, bias_n, n_out, k_in, tile, sched.key))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        report.swapped.append(name)
    report.shared_input_groups = [sorted(g.successors(x)) for x in g.nodes if g.out_degree(x) > 1]
    for name, why in report.reference.items():
        warnings.warn(f"patch backend: {name} runs the reference path: {why}", stacklevel=2)
    gm.graph.lint()
    gm.recompile()
    return report
