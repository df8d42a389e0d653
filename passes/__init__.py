"""FX-graph passes: capture a model's graph, find its linear ops, insert trainable hybrid-mask nodes."""
from .capture import CapturedGraph, capture
from .find_linears import LinearPlan, LinearSite, find_linears
from .insert_masks import MaskNode, MaskState, insert_masks

__all__ = ["CapturedGraph", "capture", "LinearPlan", "LinearSite", "find_linears", "MaskNode", "MaskState",
           "insert_masks"]
