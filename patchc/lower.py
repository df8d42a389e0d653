"""`patchc lower`: freeze a prune run into a checkpoint, and `patchc.load` it back.

packed (default)  DIR/manifest.json      format, version, tile, dtype, layers, experts, per-tensor sha256
                  DIR/packed.safetensors hybrid layers in patchc.format (bitmap/dense/values/meta), and
                                         fused MoE expert weights (one packed matrix [E*out, in] each)
                  DIR/model.safetensors  every other tensor (embeddings, norms, biases, lm_head, ...)
                  DIR/config.json + tokenizer files
dense             a plain Hugging Face checkpoint with the pruned weights zeroed (transformers alone
                  loads it) + DIR/patchc.json saying where it came from.

Fused MoE expert weights are stored packed (their bytes on disk follow the sparsity) but patchc.load
decompresses them to dense zero-filled [E, out, in] parameters: the model's own experts implementation runs
them (exactly W * M, no speedup for experts).

A checkpoint folder is built under a temporary name and renamed into place when complete, so a crash
never leaves a half-written folder that looks valid. Nothing in a manifest is executed or imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from patchc.format import (FORMAT, FORMAT_VERSION, PACKED_FIELDS, FormatError, PackedLayer, dense_bytes, pack_experts,
                           pack_layer, sha256, unpack_experts, validate_packed)
from patchc.coverage import coverage_report
from patchc.fingerprint import load_recorded_model
from patchc.hf_quantizer import config_entry as hf_config_entry
from patchc.io import read_safetensors, write_json, write_safetensors
from patchc.models import dtype_name, parse_dtype, resolve_device
from patchc.oneshot import weight_2d
from patchc.outdir import CHECKPOINT_MARKERS, check_out, clean_stale, make_temp_dir, publish
from patchc.prune_dir import apply_hard_masks_, read_prune_dir
from patchc.runtime import HybridLinear

PACKED_FILE, REST_FILE, MANIFEST = "packed.safetensors", "model.safetensors", "manifest.json"


class CheckpointError(ValueError):
    """A lowered checkpoint that is missing, corrupt, of another version, or for another model."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_dir(out: Path, overwrite: bool, markers: tuple[str, ...] = CHECKPOINT_MARKERS, protected=()):
    """Yield a temporary folder beside `out` (`.NAME.tmp-PID-*`); when the block succeeds, rename it to `out`
    without replacing anything that appeared meanwhile, or, with overwrite, replacing only an earlier patchc
    checkpoint (see patchc.outdir). Temporary folders of killed runs beside `out` are removed first."""
    out = Path(out)
    check_out(out, overwrite=overwrite, markers=markers, protected=protected, what="--out")
    clean_stale(out)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        publish(tmp, out, overwrite, markers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return the aliases."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        kept[k] = v
    return kept, aliases


def lower(prune_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "packed",
          dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Pack the prune run in `prune_dir` into `out_dir`; returns the manifest (packed) or summary (dense)."""
    if fmt not in ("packed", "dense"):
        raise ValueError(f"format {fmt!r} unknown; choose packed or dense")
    from patchc.preflight import check_lower, recorded_source

    masks = check_lower(prune_dir, out_dir, overwrite=overwrite)  # before the model is loaded
    rep = masks.report
    dtype = dtype or parse_dtype(rep.get("dtype", "float32"))
    # the recorded absolute source, its fingerprint checked (never a path relative to the current folder)
    loaded = load_recorded_model(rep, device="cpu", dtype=dtype, where=str(Path(prune_dir) / "prune.json"))
    model, out = loaded.model, Path(out_dir)
    apply_hard_masks_(model, masks)  # validates every layer against the model
    provenance = {"spec": rep["model"], "source": rep.get("model_resolved") or rep.get("model_source"),
                  "fingerprint": rep.get("model_fingerprint"), "architecture": type(model).__name__,
                  "prune_dir": str(Path(prune_dir).resolve())}
    sparsity = {"target": rep["sparsity"]["target"], "achieved": rep["sparsity"]["achieved"],
                "coverage": coverage_report(model, [l["name"] for l in rep["layers"]], warn=False)}
    kind, source = recorded_source(rep)
    protected = [prune_dir, source if kind in ("dir", "gguf") else None]
    with atomic_dir(out, overwrite, protected=protected) as tmp:
        model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if fmt == "dense":
            model.save_pretrained(tmp, safe_serialization=True)
            summary = {"format": "dense-zeroed", "model": provenance, "sparsity": sparsity, "tile": masks.tile}
            write_json(tmp / "patchc.json", summary)
            return summary
        manifest = _write_packed(model, masks, tmp, dtype, provenance, sparsity)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = hf_config_entry()  # from_pretrained: patchc's loader, or a refusal
        write_json(tmp / "config.json", cfg)
    return manifest


def _pack_experts_entry(model, masks, layer: dict, packed_tensors: dict) -> dict:
    """Pack one fused MoE expert weight under its parameter FQN; its manifest entry."""
    name, tr = layer["name"], bool(layer.get("transposed", False))
    w = weight_2d(model, name, tr).detach().contiguous()                        # [E, out, in]
    p = pack_experts(w, masks.bitmaps[name], masks.patterns[name], masks.tile)
    for k, v in p.tensors().items():
        packed_tensors[f"{name}.{k}"] = v
    return {"name": name, "shape": list(w.shape), "transposed": tr, **_packed_stats(p, w.element_size())}


def _packed_stats(p: PackedLayer, element_size: int) -> dict:
    """A packed weight's manifest numbers: tiles, dense tiles, sparsity, bytes packed and dense."""
    return {"tiles": p.bitmap.numel(), "dense_tiles": int(p.bitmap.sum()), "sparsity": p.sparsity,
            "bytes": p.nbytes + p.bitmap.numel(), "dense_bytes": dense_bytes(p.out_features, p.in_features, element_size)}


def _write_packed(model, masks, tmp: Path, dtype, provenance: dict, sparsity: dict) -> dict:
    packed_tensors, layers, experts, hybrid_weights = {}, [], [], set()
    for layer in tqdm(masks.report["layers"], desc="patchc lower: packing", unit="layer", disable=None):  # a bar on a TTY
        name, tr = layer["name"], bool(layer.get("transposed", False))
        hybrid_weights.add(name)
        if layer.get("experts"):
            experts.append(_pack_experts_entry(model, masks, layer, packed_tensors))
            continue
        module = name.rsplit(".", 1)[0]
        w = weight_2d(model, name, tr).detach().contiguous()
        p = pack_layer(w, masks.bitmaps[name], masks.patterns[name], masks.tile)
        for k, v in p.tensors().items():
            packed_tensors[f"{module}.{k}"] = v
        bias = getattr(model.get_submodule(module), "bias", None)
        layers.append({"name": name, "module": module, "shape": [p.out_features, p.in_features], "transposed": tr,
                       "has_bias": bias is not None, **_packed_stats(p, w.element_size())})
    rest, aliases = _dedupe({k: v for k, v in model.state_dict().items() if k not in hybrid_weights})
    for name in sorted(hybrid_weights):  # empty placeholders: plain transformers refuses them (hf_quantizer.py)
        rest[name] = torch.empty(0, dtype=dtype)
    write_safetensors(tmp / PACKED_FILE, packed_tensors)
    write_safetensors(tmp / REST_FILE, rest)
    tensors = {f"{PACKED_FILE}::{k}": _describe(v) for k, v in packed_tensors.items()}
    tensors.update({f"{REST_FILE}::{k}": _describe(v) for k, v in rest.items()})
    packed_b = sum(l["bytes"] for l in layers + experts)
    dense_b = sum(l["dense_bytes"] for l in layers + experts)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "tile": masks.tile, "dtype": dtype_name(dtype),
        "model": provenance, "sparsity": sparsity,
        "bytes": {"hybrid_packed": packed_b, "hybrid_dense": dense_b, "ratio": packed_b / dense_b if dense_b else 1.0},
        "layers": layers, "aliases": aliases, "tensors": tensors,
        # fused MoE expert weights: packed on disk, decompressed to dense [E, out, in] parameters by patchc.load
        "experts": experts,
        # hybrid layers reading one input (q/k/v, gate/up; found on the prune graph): patchc.load stores each
        # group's packed tiles in one allocation so the patch backend can run the group as one launch
        "groups": _hybrid_groups(masks.report.get("groups", []), {l["module"] for l in layers}),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)  # edits to any field are detected on read
    write_json(tmp / MANIFEST, manifest)  # last: a folder without it is never a checkpoint
    return manifest


def _hybrid_groups(groups: list[dict], hybrid_modules: set[str]) -> list[list[str]]:
    out = []
    for g in groups:
        mods = [m.rsplit(".", 1)[0] for m in g.get("members", [])]
        if len(mods) > 1 and all(m in hybrid_modules for m in mods):
            out.append(mods)
    return out


def stack_groups_(model: torch.nn.Module, groups: list[list[str]]) -> int:
    """Make the packed buffers of each group's HybridLinears consecutive views of one allocation per field
    (concatenated along the stored tiles, in group order): no extra memory, and the backend's pass sees
    one storage it can launch over once. Groups that differ in tile, input size, dtype or bias-ness are
    left alone; plain-dense members (HybridLinear.weight) are left out and the rest stacked. Returns how many
    groups were stacked. Moving the model afterwards (.to) undoes it."""
    n = 0
    for names in groups:
        mods = [model.get_submodule(m) for m in names]
        if not all(isinstance(m, HybridLinear) for m in mods):
            continue
        mods = [m for m in mods if m.weight is None]  # plain-dense members run as F.linear: stack the rest
        if len(mods) < 2:
            continue
        first = mods[0]
        if any((m.tile, m.in_features, m.dense.dtype, m.dense.device, m.bias is None) !=
               (first.tile, first.in_features, first.dense.dtype, first.dense.device, first.bias is None)
               for m in mods):
            continue
        for k in ("dense", "values", "meta"):
            parts = [getattr(m, k) for m in mods]
            base = torch.cat(parts)
            start = 0
            for m, t in zip(mods, parts):
                setattr(m, k, base[start: start + t.shape[0]])
                start += t.shape[0]
        n += 1
    return n


def _describe(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": sha256(t)}


# ---------------------------------------------------------------------------------------------
# Reading: one verification path (verify() runs every check load() does, on a meta-device model)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FILES = (MANIFEST, PACKED_FILE, REST_FILE, "config.json")


def manifest_digest(m: dict) -> str:
    """sha256 of the canonical JSON of every manifest field but manifest_sha256 itself."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    d = Path(path)
    mf = d / MANIFEST
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a folder: pass the output folder of `patchc lower`")
    for f in CHECKPOINT_FILES:
        if (d / f).is_symlink():
            raise CheckpointError(f"{d / f} is a symbolic link: a checkpoint's files must be its own (copy them in)")
    if not mf.is_file():
        raise CheckpointError(f"{mf} is missing: {d} is not a packed patchc checkpoint "
                              "(was `patchc lower` interrupted, or is it a --format dense checkpoint?)")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: format {m.get('format') if isinstance(m, dict) else None!r} is not {FORMAT!r}")
    if m.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{mf}: format version {m.get('version')!r} is not supported by this patchc "
                              f"(it reads version {FORMAT_VERSION}); upgrade patchc or lower again")
    if not isinstance(m.get("manifest_sha256"), str):
        raise CheckpointError(f"{mf} has no manifest_sha256 (written by an older patchc): lower the model again")
    if manifest_digest(m) != m["manifest_sha256"]:
        raise CheckpointError(f"{mf} was edited after `patchc lower` wrote it (manifest_sha256 does not match its "
                              "content): lower the model again")
    for key, kind in (("tile", int), ("dtype", str), ("layers", list), ("tensors", dict), ("aliases", dict)):
        if not isinstance(m.get(key), kind):
            raise CheckpointError(f"{mf}: field {key!r} is missing or not a {kind.__name__}")
    if not isinstance(m.setdefault("experts", []), list):  # absent in checkpoints of models without experts
        raise CheckpointError(f"{mf}: field 'experts' is not a list")
    for f in (PACKED_FILE, REST_FILE, "config.json"):
        if not (d / f).is_file():
            raise CheckpointError(f"{d / f} is missing: the checkpoint is incomplete")
    return m


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a corrupt or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}): truncated or replaced? lower the model again") from None


def _load_tensors(d: Path, manifest: dict, verify: bool) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for f in (PACKED_FILE, REST_FILE):
        tensors = _read_file(d / f)
        listed = {k.split("::", 1)[1] for k in manifest["tensors"] if k.startswith(f + "::")}
        if set(tensors) != listed:
            extra, missing = sorted(set(tensors) - listed)[:3], sorted(listed - set(tensors))[:3]
            raise CheckpointError(f"{d / f} does not hold the tensors the manifest lists "
                                  f"(missing {missing}, unlisted {extra})")
        for k, v in tensors.items():
            desc = manifest["tensors"][f"{f}::{k}"]
            if list(v.shape) != desc["shape"] or dtype_name(v.dtype) != desc["dtype"]:
                raise CheckpointError(f"{f}::{k}: shape/dtype {list(v.shape)} {v.dtype} differ from the manifest's "
                                      f"{desc['shape']} {desc['dtype']}")
            if verify and sha256(v) != desc["sha256"]:
                raise CheckpointError(f"checksum mismatch for {f}::{k}: the file is corrupt; lower the model again")
        out[f] = tensors
    return out


def _build_empty(d: Path, dtype: torch.dtype, meta: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(d)  # plain JSON; no remote code is ever trusted
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the patchc marker (see _mark_config); patchc loads the weights itself
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _read_packed(packed: dict, prefix: str, out_f: int, in_f: int, manifest: dict, dtype) -> PackedLayer:
    """The PackedLayer stored under `prefix` ([out_f, in_f]), validated, in the manifest's dtype."""
    try:
        p = PackedLayer(*(packed[f"{prefix}.{k}"] for k in PACKED_FIELDS), out_f, in_f, manifest["tile"])
        validate_packed(p, prefix)
    except (KeyError, FormatError) as e:
        raise CheckpointError(f"{prefix}: packed tensors missing or inconsistent ({e})") from e
    for k in ("dense", "values"):
        if getattr(p, k).dtype != dtype:
            raise CheckpointError(f"{prefix}.{k} is {getattr(p, k).dtype} but the manifest says {manifest['dtype']}")
    return p


def _check_experts(manifest: dict, packed: dict, model, dtype) -> list[tuple[str, int, bool, PackedLayer]]:
    """(parameter FQN, experts, stored [E, in, out], packed layer) per fused MoE expert weight, checked."""
    plan = []
    for entry in manifest["experts"]:
        try:
            name, (e, out_f, in_f), tr = entry["name"], entry["shape"], bool(entry.get("transposed", False))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"manifest 'experts' entry {str(entry)[:80]} is malformed ({err})") from None
        try:
            parent, _, leaf = name.rpartition(".")
            w = getattr(model.get_submodule(parent), leaf)  # a parameter (or transformers' pending placeholder)
            if not isinstance(w, torch.Tensor):
                raise AttributeError(f"{name} is not a tensor")
        except AttributeError as err:
            raise CheckpointError(f"the model built from config.json has no expert weight {name}: the manifest does "
                                  "not match this model") from err
        want = (e, in_f, out_f) if tr else (e, out_f, in_f)
        if tuple(w.shape) != want:
            raise CheckpointError(f"{name}: the model's expert weight is {list(w.shape)} but the manifest says "
                                  f"{list(want)}: manifest and config.json do not match")
        if out_f % manifest["tile"]:
            raise CheckpointError(f"{name}: packed tensors missing or inconsistent (expert rows {out_f} are not a "
                                  f"multiple of tile {manifest['tile']})")
        plan.append((name, e, tr, _read_packed(packed, name, e * out_f, in_f, manifest, dtype)))
    return plan


def _check(manifest: dict, tensors: dict, model, plain_dense: bool = True):
    """Every check between the manifest, the tensors and the model built from config.json; returns
    ([(module name, module to replace, packed layer) per hybrid layer], [_check_experts' tuples]).
    Nothing is changed."""
    try:
        dtype = parse_dtype(manifest["dtype"])
    except ValueError as e:
        raise CheckpointError(f"manifest dtype: {e}") from None
    packed = tensors[PACKED_FILE]
    plan = []
    for layer in manifest["layers"]:
        mod_name, (out_f, in_f) = layer["module"], layer["shape"]
        try:
            old = model.get_submodule(mod_name)
            w = old.weight
        except AttributeError as e:
            raise CheckpointError(f"the model built from config.json has no linear {mod_name}: the manifest does not "
                                  "match this model") from e
        want = (in_f, out_f) if layer.get("transposed") else (out_f, in_f)
        if tuple(w.shape) != want:
            raise CheckpointError(f"{mod_name}: the model's weight is {list(w.shape)} but the manifest says "
                                  f"{list(want)}: manifest and config.json do not match")
        plan.append((mod_name, old, _read_packed(packed, mod_name, out_f, in_f, manifest, dtype)))
    experts = _check_experts(manifest, packed, model, dtype)
    rest = tensors[REST_FILE]
    for alias, target in manifest["aliases"].items():
        if target not in rest:
            raise CheckpointError(f"alias {alias} -> {target}: {target} is not in {REST_FILE}")
        if alias in rest:
            raise CheckpointError(f"alias {alias} -> {target}: {alias} is stored in {REST_FILE} too (an alias would "
                                  "replace its own weights)")
    model_state = model.state_dict()
    hybrid_keys = {f"{l['module']}.{k}" for l in manifest["layers"] for k in (*PACKED_FIELDS, "weight")}
    hybrid_keys |= {e[0] for e in experts}
    for k in rest:
        if k in hybrid_keys and rest[k].numel():
            raise CheckpointError(f"{REST_FILE}::{k} must be an empty placeholder (the layer is in {PACKED_FILE})")
    given = {k for k in rest if k not in hybrid_keys} | set(manifest["aliases"])
    missing = [k for k in model_state if k not in given and k not in hybrid_keys]
    unexpected = [k for k in given if k not in model_state]
    if missing or unexpected:
        raise CheckpointError(f"{REST_FILE} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k in given:
        t = rest[manifest["aliases"].get(k, k)]
        if tuple(t.shape) != tuple(model_state[k].shape):
            raise CheckpointError(f"{k}: {list(t.shape)} in the checkpoint, {list(model_state[k].shape)} in the model")
    return plan, experts


def verify(path: str | os.PathLike) -> dict:
    """Everything load() checks (manifest and its checksum, files, every tensor's checksum, the model built from
    config.json against the manifest), on a meta-device model: no weights are materialised."""
    d = Path(path)
    manifest = read_manifest(d)
    tensors = _load_tensors(d, manifest, verify=True)
    _check(manifest, tensors, _build_empty(d, parse_dtype(manifest["dtype"]), meta=True))
    return manifest


def load(path: str | os.PathLike, device: str | torch.device = "auto", verify: bool = True, plain_dense: bool = True):
    """Load a packed checkpoint as a Hugging Face model whose hybrid linears are HybridLinear modules.
    plain_dense: layers with no 2:4 tile hold a row-major weight and run as F.linear (the vendor GEMM; see
    HybridLinear); False keeps them packed, on the hybrid kernels. device "auto": cuda if available, else cpu."""
    device = resolve_device(device)
    d = Path(path)
    manifest = read_manifest(d)
    try:
        dtype = parse_dtype(manifest["dtype"])
    except ValueError as e:
        raise CheckpointError(f"manifest dtype: {e}") from None
    tensors = _load_tensors(d, manifest, verify)
    model = _build_empty(d, dtype)
    return _install(model, manifest, tensors, device, plain_dense)


def _install(model, manifest: dict, tensors: dict, device, plain_dense: bool = True):
    """Checked (_check), then: hybrid layers become HybridLinears, fused expert weights are decompressed
    (W * M, zero-filled), the rest of the weights are loaded."""
    linears, experts = _check(manifest, tensors, model, plain_dense)
    for mod_name, old, p in linears:
        hl = HybridLinear(p, bias=getattr(old, "bias", None), name=mod_name, plain_dense=plain_dense)
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, hl)
    hybrid_keys = {f"{l['module']}.weight" for l in manifest["layers"]} | {e[0] for e in experts}
    rest = {k: v for k, v in tensors[REST_FILE].items() if k not in hybrid_keys}
    for name, e, tr, p in experts:
        w = unpack_experts(p, e)                                                # [E, out, in]
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        if hasattr(owner, leaf):
            delattr(owner, leaf)
        owner.register_parameter(leaf, torch.nn.Parameter(w.mT.contiguous() if tr else w, requires_grad=False))
    for alias, target in manifest["aliases"].items():
        rest[alias] = rest[target]
    model.load_state_dict(rest, strict=False)
    for alias, target in manifest["aliases"].items():  # share tied weights (one copy in memory)
        parent, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        tgt = model.get_parameter(target) if target in dict(model.named_parameters(remove_duplicate=False)) else None
        if tgt is not None and isinstance(getattr(owner, leaf, None), torch.nn.Parameter):
            setattr(owner, leaf, tgt)
    model.to(device).eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    groups = manifest.get("groups", [])
    layer_names = {l["module"] for l in manifest["layers"]}
    if not (isinstance(groups, list) and all(isinstance(g, list) and set(g) <= layer_names for g in groups)):
        raise CheckpointError("manifest field 'groups' must list groups of the manifest's layer modules")
    stack_groups_(model, groups)
    model.patchc_manifest = manifest
    return model


def memory_report(model) -> dict:
    """Weight bytes of the hybrid linears in memory vs the same layers dense (16-bit or model dtype)."""
    from patchc.runtime import hybrid_layers

    layers = hybrid_layers(model)
    packed = sum(m.weight_nbytes for m in layers.values())
    dense = sum(m.out_features * m.in_features * m.values.element_size() for m in layers.values())
    return {"hybrid_layers": len(layers), "packed_bytes": packed, "dense_bytes": dense,
            "ratio": packed / dense if dense else 1.0}
