"""Find the linear ops of a captured graph whose weight is a parameter, and how they group.

Recognised: aten.linear(x, W[out, in], b), aten.mm(x, W[in, out]), aten.addmm(b, x, W[in, out])
(GPT-2's Conv1D stores W as [in, out]), and mm/addmm over t(W)/permute(W, [1, 0]) of a [out, in]
parameter. Each site maps to the HF parameter FQN of its weight. A networkx dataflow graph over the
FX nodes names the groups of linears that read the same input (q/k/v, gate/up) for later fusion.

Fused MoE experts: transformers 5 holds the experts of Mixtral / Qwen2-MoE / Qwen3-MoE as one 3-D parameter
per projection ([E, out, in], or [E, in, out] where the experts class says is_transposed) and runs them
as a grouped matmul (grouped_mm: param -> transpose(-2, -1) -> aten._grouped_mm, or the
transformers::grouped_mm_fallback custom op where that is unavailable, e.g. fp32 under torch.export) or
as a batched one (batched_mm: param -> index -> aten.bmm). A 3-D parameter that reaches such an op through
views is an expert site (op "experts"): E matrices [out, in], each tiled like a linear. Its orientation
is read from the graph: the grouped ops take [E, in, out], bmm's first operand is [S, out, in].
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import networkx as nx
import torch

from patchc.mask import check_tileable

from .capture import PREFIX

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_MM = {aten.mm.default}
_ADDMM = {aten.addmm.default}
_TRANSPOSE = {aten.t.default, aten.permute.default, aten.transpose.int}
_EMBEDDING = {aten.embedding.default}
# grouped matmuls over fused expert weights: (tokens sorted by expert, weight [E, in, out], offsets)
_GROUPED = {"aten._grouped_mm.default", "aten.grouped_mm.default", "transformers.grouped_mm_fallback.default"}
_SAME = {aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten.detach.default, aten.lift_fresh_copy.default}
DEFAULT_EXCLUDE = (r"(^|\.)lm_head\.", r"(^|\.)(embed_tokens|wte|wpe|embed_out)\.")


@dataclass
class LinearSite:
    name: str            # HF parameter FQN of the weight, e.g. model.layers.0.self_attn.q_proj.weight
    node: str            # FX node of the matmul
    weight_node: str     # FX get_attr node of the weight
    op: str              # linear | mm | addmm
    out_features: int
    in_features: int
    transposed: bool     # the parameter is stored [in, out] (Conv1D), [E, in, out] for experts
    role: str            # the module's own name: q_proj, c_attn, fc1, ... (experts: gate_up_proj, down_proj)
    input_node: str      # FX node of the activation the op reads ("" for experts)
    group: int | None = None  # index into LinearPlan.groups
    skip_reason: str | None = None
    experts: int = 0     # a fused MoE expert weight: E matrices [out, in] (0: a plain linear)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def lead(self) -> tuple[int, ...]:
        """Leading dims of the weight and of every per-weight mask tensor: (E,) for experts, () for a linear."""
        return (self.experts,) if self.experts else ()

    @property
    def shape(self) -> list[int]:
        """The weight's shape in [.., out, in] orientation: [out, in] or [E, out, in]."""
        return [*self.lead, self.out_features, self.in_features]

    @property
    def numel(self) -> int:
        return max(self.experts, 1) * self.out_features * self.in_features


@dataclass
class LinearGroup:
    kind: str            # qkv | gate_up | shared_input
    members: list[str]   # parameter FQNs, in graph order
    input_node: str


@dataclass
class LinearPlan:
    sites: list[LinearSite]                     # every linear with a parameter weight
    groups: list[LinearGroup] = field(default_factory=list)
    graph: nx.DiGraph | None = None             # dataflow graph over FX node names

    @property
    def masked(self) -> list[LinearSite]:
        return [s for s in self.sites if s.skip_reason is None]

    @property
    def skipped(self) -> list[LinearSite]:
        return [s for s in self.sites if s.skip_reason is not None]


def _param_of(node: torch.fx.Node) -> tuple[torch.fx.Node, bool] | None:
    """(get_attr node, seen through a transpose) if `node` is a parameter or its 2-D transpose."""
    if node.op == "get_attr":
        return node, False
    if node.op == "call_function" and node.target in _TRANSPOSE:
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "get_attr":
            if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
                return None
            return src, True
    return None


def _shape(gm: torch.fx.GraphModule, attr: torch.fx.Node) -> torch.Size:
    return gm.get_parameter(attr.target).shape if _is_param(gm, attr) else torch.Size()


def _is_param(gm: torch.fx.GraphModule, attr: torch.fx.Node) -> bool:
    try:
        gm.get_parameter(attr.target)
        return True
    except AttributeError:
        return False


def find_linears(gm: torch.fx.GraphModule, tile: int, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> LinearPlan:
    """Every linear op with a parameter weight; those not to be masked carry a skip_reason.

    include / exclude are regular expressions searched in the weight FQN; when include is given only
    matching layers are masked. lm_head and embeddings (and any weight an embedding reads) are
    excluded by default.
    """
    excl = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *(exclude or []))]
    incl = [re.compile(p) for p in include or []]
    sites: list[LinearSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _expert_operands(node):
            _add_expert_site(gm, node, sites, tile, excl, incl)
            continue
        if node.target in _LINEAR:
            x, w = node.args[0], node.args[1]
            found = _param_of(w)
            if not found or found[1]:
                continue
            attr, transposed, op = found[0], False, "linear"
        elif node.target in _MM or node.target in _ADDMM:
            x, w = (node.args[0], node.args[1]) if node.target in _MM else (node.args[1], node.args[2])
            found = _param_of(w)
            if not found:
                continue
            attr, op = found[0], "mm" if node.target in _MM else "addmm"
            transposed = not found[1]  # mm(x, W) with W a parameter: W is [in, out]
        else:
            continue
        if not _is_param(gm, attr):
            continue
        shape = _shape(gm, attr)
        if len(shape) != 2:
            continue
        out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        name = attr.target[len(PREFIX):] if attr.target.startswith(PREFIX) else attr.target
        parts = name.split(".")
        role = parts[-2] if len(parts) >= 2 else name
        site = LinearSite(name=name, node=node.name, weight_node=attr.name, op=op, out_features=int(out_f),
                          in_features=int(in_f), transposed=transposed, role=role,
                          input_node=x.name if isinstance(x, torch.fx.Node) else "")
        if any(u.target in _EMBEDDING for u in attr.users if u.op == "call_function"):
            site.skip_reason = "weight shared with an embedding (tied lm_head)"
        elif any(p.search(name) for p in excl):
            site.skip_reason = "excluded by name (lm_head/embeddings by default, or --exclude)"
        elif incl and not any(p.search(name) for p in incl):
            site.skip_reason = "not matched by --include"
        elif any(s.name == name for s in sites):
            site.skip_reason = "weight used by more than one linear op"
        else:
            site.skip_reason = check_tileable(site.out_features, site.in_features, tile)
        sites.append(site)
    graph = dataflow_graph(gm)
    plan = LinearPlan(sites=sites, graph=graph)
    plan.groups = group_shared_inputs(plan, graph, gm)
    return plan


def _expert_operands(node: torch.fx.Node) -> list[tuple[object, bool]]:
    """(operand, whether the op reads it as [.., in, out]) for each operand of a grouped / batched matmul."""
    if str(node.target) in _GROUPED:
        return [(node.args[1], True)]
    if node.target is aten.bmm.default:
        return [(node.args[0], False), (node.args[1], True)]
    return []


def _rank(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    return len(_shape(gm, node)) if node.op == "get_attr" and _is_param(gm, node) else None


def _expert_param(gm: torch.fx.GraphModule, node) -> tuple[torch.fx.Node, bool] | None:
    """(get_attr node of a 3-D parameter, last two dims swapped on the way) when `node` is that parameter seen
    through transposes of its last two dims, expert indexing (dim 0) and copies; else None."""
    swapped = False
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            return (node, swapped) if _is_param(gm, node) and len(_shape(gm, node)) == 3 else None
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        src, t = node.args[0], node.target
        if t is aten.transpose.int:
            nd = _rank(gm, src)
            if nd is None or {d % nd for d in node.args[1:3]} != {nd - 2, nd - 1}:
                return None
            swapped = not swapped
        elif t is aten.permute.default:
            perm = list(node.args[1])
            nd = len(perm)
            if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
                swapped = not swapped
            elif perm != list(range(nd)):
                return None
        elif t is aten.index.Tensor:
            if len(node.args[1]) != 1:  # W[expert_ids]: one index tensor, on the expert dim
                return None
        elif t not in _SAME:
            return None
        node = src
    return None


def _add_expert_site(gm, node, sites: list[LinearSite], tile: int, excl, incl) -> None:
    """A fused MoE expert weight read by the grouped / batched matmul `node` (once per weight)."""
    for operand, reads_in_out in _expert_operands(node):
        found = _expert_param(gm, operand)
        if found is None:
            continue
        attr, swapped = found
        transposed = reads_in_out != swapped          # stored [E, in, out]
        e, a, b = (int(d) for d in _shape(gm, attr))
        out_f, in_f = (b, a) if transposed else (a, b)
        name = attr.target[len(PREFIX):] if attr.target.startswith(PREFIX) else attr.target
        earlier = next((s for s in sites if s.name == name), None)
        if earlier is not None:
            if earlier.transposed != transposed and earlier.skip_reason is None:
                earlier.skip_reason = "expert weight read in two orientations"
            continue
        site = LinearSite(name=name, node=node.name, weight_node=attr.name, op="experts", out_features=out_f,
                          in_features=in_f, transposed=transposed, role=name.split(".")[-1], input_node="",
                          experts=e)
        if any(p.search(name) for p in excl):
            site.skip_reason = "excluded by name (lm_head/embeddings by default, or --exclude)"
        elif incl and not any(p.search(name) for p in incl):
            site.skip_reason = "not matched by --include"
        else:
            site.skip_reason = check_tileable(out_f, in_f, tile)
        sites.append(site)


def dataflow_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Directed graph over FX node names: an edge u -> v when v reads u's output."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


_SILU = {"aten.silu.default", "aten.gelu.default", "aten.gelu_tanh.default"}


def group_shared_inputs(plan: LinearPlan, graph: nx.DiGraph, gm: torch.fx.GraphModule) -> list[LinearGroup]:
    """Groups of masked linears reading one activation; kind qkv / gate_up when the graph shows it."""
    by_input: dict[str, list[LinearSite]] = {}
    for s in plan.masked:
        if s.input_node:  # experts read their routed tokens through the grouped op: no shared-input group
            by_input.setdefault(s.input_node, []).append(s)
    groups = []
    for inp, members in by_input.items():
        if len(members) < 2:
            continue
        kind = "shared_input"
        roles = {m.role for m in members}
        if len(members) == 3 and roles >= {"q_proj", "k_proj", "v_proj"}:
            kind = "qkv"
        elif len(members) == 2 and _is_gate_up(graph, members[0].node, members[1].node):
            kind = "gate_up"
        for m in members:
            m.group = len(groups)
        groups.append(LinearGroup(kind=kind, members=[m.name for m in members], input_node=inp))
    return groups


def _is_gate_up(graph: nx.DiGraph, a: str, b: str) -> bool:
    """act(a) * b or act(b) * a: a mul node fed by one linear directly and by the other through an activation."""
    for first, second in ((a, b), (b, a)):
        for act in graph.successors(first):
            if graph.nodes[act]["target"] not in _SILU:
                continue
            for mul in graph.successors(act):
                if graph.nodes[mul]["target"].startswith("aten.mul") and graph.has_edge(second, mul):
                    return True
    return False
