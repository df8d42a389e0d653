"""Nothing lost, nothing silently wrong: what a new user runs into (versions, output folders, wrong weights,
coverage, integrity, and arguments checked before anything is loaded)."""
import json
import os
import types

import pytest
import torch


# ---------------------------------------------------------------------------------------------
# 1. dynamo source names: the backend's layer names whatever transformers' wrapping
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
    "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
    "L['self'].model.layers[0].mlp.down_proj.bitmap",
    "L['kwargs']['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
])
def test_backend_layer_name_any_source_naming(source):
    from patchc.passes.swap_kernels import _layer_name

    g = torch.fx.Graph()
    x = g.placeholder("x")
    bm = g.placeholder("bitmap")
    bm.meta["grapharg"] = types.SimpleNamespace(source=types.SimpleNamespace(name=source))
    node = g.call_function(torch.add, (x, bm))
    assert _layer_name(node) == "model.layers.0.mlp.down_proj"
