"""patchc: learnable tile-level hybrid (dense / 2:4) sparsity for LLMs, as a compiler.

    import patchc
    res = patchc.prune("smollm2-135m", ["data.txt"], "out/", patchc.PruneConfig(sparsity=0.35, mode="joint"))
    from patchc.lower import lower; lower("out/", "ckpt/")
    model = patchc.load("ckpt/", device="cuda")
"""
from patchc.lower import load
from patchc.models import load_model
from patchc.train import PruneConfig, PruneResult, TrainingDiverged, prune

from patchc import runtime as _runtime  # noqa: F401  (registers the patchc:: custom ops)
from patchc.backend import register as _register_backend

_register_backend()
from patchc.hf_quantizer import register as _register_hf_quantizer  # noqa: E402

_register_hf_quantizer()  # from_pretrained(packed checkpoint) loads through patchc once patchc is imported
__version__ = "0.1.0"
__all__ = ["PruneConfig", "PruneResult", "TrainingDiverged", "load", "load_model", "prune", "__version__"]
