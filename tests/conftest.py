import contextlib
import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run under its interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from patchc import config  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def switches():
    """patchc.config.override for the length of one test: switches(mma_sp=False) is what PATCHC_MMA_SP=0 does."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(config.override(**kw))

SHARED = config.settings().shared or ROOT.parent / "shared"
ASSETS = SHARED / "assets"
WIKI_VALID = ASSETS / "data/calib/wikitext2_v1_valid.txt"
WIKI_TEST = ASSETS / "data/wikitext2/wiki.test.raw.txt"
SMOLLM2 = ASSETS / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_ARCHS = ["llama", "qwen2", "gemma3", "gpt2", "opt"]


def need(path: Path) -> Path:
    """The shared asset, or a failure that says where it was looked for (CI has ../shared beside the repo)."""
    if not path.exists():
        pytest.fail(f"missing asset {path}: tests expect ../shared beside the checkout (or set PATCHC_SHARED)")
    return path


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    return need(WIKI_VALID)


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    return need(WIKI_TEST)


@pytest.fixture()
def small_text(tmp_path) -> Path:
    """A few KB of real text (from the shared calibration set) for fast tests."""
    p = tmp_path / "small.txt"
    p.write_text(need(WIKI_VALID).read_text()[:60_000])
    return p


@pytest.fixture(scope="session")
def pruned_tiny(tmp_path_factory):
    """prune a tiny model once per session: pruned_tiny(arch, sparsity=..., mode=...) -> prune folder."""
    from patchc import PruneConfig, prune

    root = tmp_path_factory.mktemp("pruned_tiny")
    text = root / "t.txt"
    text.write_text(need(WIKI_VALID).read_text()[:60_000])
    cache = {}

    def get(arch: str, sparsity: float = 0.45, mode: str = "joint"):
        key = (arch, sparsity, mode)
        if key not in cache:
            out = root / f"{arch}_{sparsity}_{mode}"
            prune(f"tiny:{arch}", [str(text)], out, PruneConfig(sparsity=sparsity, mode=mode, steps=3, seq_len=64,
                                                               batch_size=2, calib_samples=4), progress=False)
            cache[key] = out
        return cache[key]

    return get
