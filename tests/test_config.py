"""patchc.config: every PATCHC_* switch parsed in one place, with one convention."""
import re
import subprocess
from pathlib import Path

import pytest

from patchc import config
from patchc.config import Settings, parse_bool

ROOT = Path(__file__).resolve().parents[1]


def test_one_boolean_convention():
    for v in ("1", "true", "YES", "on"):
        assert parse_bool("PATCHC_X", v, False) is True
    for v in ("0", "false", "No", "OFF"):
        assert parse_bool("PATCHC_X", v, True) is False
    assert parse_bool("PATCHC_X", None, True) is True and parse_bool("PATCHC_X", " ", False) is False
    with pytest.raises(ValueError, match="PATCHC_X='maybe'"):
        parse_bool("PATCHC_X", "maybe", True)


def test_settings_from_the_environment(tmp_path):
    s = Settings.from_env({"PATCHC_MMA_SP": "0", "PATCHC_AUTOTUNE": "yes", "PATCHC_CACHE": str(tmp_path),
                           "PATCHC_TEST_SHAPES": "llama2-7b", "PATCHC_KERNELS_ON_CPU": "1"})
    assert s.mma_sp is False and s.autotune is True and s.cache == tmp_path and s.test_shapes == "llama2-7b"
    assert s.kernels_on_cpu is False            # only with TRITON_INTERPRET=1
    assert Settings.from_env({"PATCHC_KERNELS_ON_CPU": "1", "TRITON_INTERPRET": "1"}).kernels_on_cpu is True
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="PATCHC_PDL"):
        Settings.from_env({"PATCHC_PDL": "2"})


def test_override_and_reload(monkeypatch):
    before = config.settings()
    with config.override(pdl=False, cslt=False):
        assert config.settings().pdl is False and config.settings().cslt is False
    assert config.settings() == before
    monkeypatch.setenv("PATCHC_WGMMA", "0")
    try:
        assert config.reload().wgmma is False
    finally:
        monkeypatch.delenv("PATCHC_WGMMA")
        config.reload()


def test_every_switch_read_anywhere_is_a_documented_field():
    """No module reads a PATCHC_* variable from the environment itself, and every PATCHC_* name the code or the
    docs mention is a Settings field (or a macro of the CUDA sources)."""
    fields = {Settings.env_name(f) for f in Settings.__dataclass_fields__}
    doc = config.__doc__
    assert all(f"| {name} |" in doc for name in fields), "a field missing from the module's table"
    files = [p for d in ("patchc", "passes", "codegen", "bench", "tests") for p in (ROOT / d).rglob("*.py")
             if "results" not in p.parts and p.name not in ("config.py", "test_config.py")]
    for p in files:
        text = p.read_text()
        assert not re.search(r"environ[^\n]*PATCHC_|getenv\([\"']PATCHC_", text), f"{p} reads a PATCHC_ switch itself"
        for name in re.findall(r"PATCHC_[A-Z0-9_]+", text):
            assert name in fields or name.startswith(("PATCHC_WGMMA_CASE", "PATCHC_WGMMA_BLOCK_NS")), (p, name)


def test_codegen_imports_nothing_above_it():
    """The kernel layer (codegen/) imports torch, triton, its own modules and patchc.config (stdlib only) - no
    models, no transformers, nothing of the pipeline above it."""
    import ast

    for p in sorted((ROOT / "codegen").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert not name.startswith("transformers"), (p.name, name)
                assert not name.startswith("patchc") or name == "patchc.config", (p.name, name)
    cfg = ast.parse((ROOT / "patchc/config.py").read_text())
    imported = {a.name for n in ast.walk(cfg) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(cfg) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "contextlib", "dataclasses", "os", "threading", "pathlib"}, imported
