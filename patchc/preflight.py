"""Checks run before any model is loaded: a bad argument fails in a second with one clear message, and
nothing is created. `prune`, `lower` and the CLI's `eval` / `bench` call them first.

What is checked: the device exists; data / evaluation paths exist and are readable (their content is
patchc.data's business); --include / --exclude regexes compile; the model spec resolves, a hub id is in
the local cache or the hub answers (HF_HUB_OFFLINE set and not cached: an error); sequence lengths fit the
model's positions (read from its config or GGUF metadata, no weights); --out is not a file, does not exist
unless --overwrite / --resume, is replaced only if it is a patchc output, and does not overlap what the run
reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from patchc.outdir import CHECKPOINT_MARKERS, PRUNE_MARKERS, OutputError, check_out


class PreflightError(ValueError):
    """An argument that cannot work, found before any model was loaded."""


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PreflightError(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                                 "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps", "xpu", "meta"):
        raise PreflightError(f"unsupported device {device!r}; use cpu or cuda")


def check_readable(paths, what: str = "data") -> None:
    """Every path exists and can be read (a file opened, a folder listed); patchc.data.DataError if not."""
    from patchc.data import DataError

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError(f"no {what} given")
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{what} {'file ' if what == 'data' else ''}{p} does not exist")
        try:
            if p.is_dir():
                next(iter(os.scandir(p)), None)
            else:
                with open(p, "rb") as f:
                    f.read(1)
        except OSError as e:
            raise DataError(f"{what} {p} cannot be read ({e.strerror or e})") from None


def check_regexes(patterns, flag: str) -> None:
    for pat in patterns or ():
        try:
            re.compile(pat)
        except re.error as e:
            raise PreflightError(f"{flag} {pat!r} is not a valid regular expression ({e})") from None


def _hub_available(repo: str) -> None:
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise PreflightError(f"model {repo!r}: a hub id that is not in the local cache, and HF_HUB_OFFLINE is set; "
                             "pass a local folder or a .gguf file, or go online")
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:  # one quick connection first: the hub client retries for ~45 s when the network is down
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise PreflightError(f"model {repo!r}: a hub id that is not in the local cache, and the hub "
                             f"({url.hostname}) cannot be reached ({e.strerror or e}); pass a local folder or a "
                             ".gguf file, or check the network") from None
    try:
        hf_hub_download(repo, "config.json", etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure means the model cannot be loaded
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise PreflightError(f"model {repo!r}: the Hugging Face hub does not give its config.json "
                             f"({type(e).__name__}: {msg}); check the id and the network, or pass a local folder") from None


def resolve_model(spec: str) -> tuple[str, str]:
    """-> (kind, source) like patchc.models.resolve_spec, plus a reachability check for hub ids."""
    from patchc.models import resolve_spec

    kind, source = resolve_spec(spec)
    if kind == "hub":
        _hub_available(source)
    return kind, source


def model_positions(kind: str, source: str) -> int | None:
    """The model's maximum positions from its config (or GGUF metadata), without loading weights."""
    try:
        if kind == "tiny":
            from patchc.models import tiny_config

            cfg = tiny_config(source)
        elif kind == "gguf":
            from gguf import GGUFReader

            r = GGUFReader(source)
            arch = r.fields["general.architecture"]
            arch = bytes(arch.parts[arch.data[0]]).decode()
            f = r.fields.get(f"{arch}.context_length")
            return int(f.parts[f.data[0]][0]) if f is not None else None
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(source)
    except Exception:  # noqa: BLE001 - the load itself will say what is wrong
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seq_len(positions: int | None, seq_len: int | None, flag: str, model: str) -> None:
    if positions is not None and seq_len is not None and seq_len > positions:
        raise PreflightError(f"{flag} {seq_len} is longer than {model}'s {positions} positions")


def check_prune(model: str, data, out, cfg, *, device: str, resume: bool, overwrite: bool,
                eval_ppl: str | None = None, eval_seq_len: int | None = None) -> int | None:
    """Everything `patchc prune` can check before loading the model; returns the model's positions (None if its
    config does not say)."""
    cfg.validate()
    check_device(device)
    check_readable(list(data) if not isinstance(data, (str, os.PathLike)) else [data], "data")
    if eval_ppl:
        check_readable([eval_ppl], "--eval-ppl file")
    check_regexes(cfg.include, "--include")
    check_regexes(cfg.exclude, "--exclude")
    kind, source = resolve_model(model)
    pos = model_positions(kind, source)
    check_seq_len(pos, cfg.seq_len or None, "--seq-len", model)   # 0 = auto: fits by construction
    if eval_ppl:
        check_seq_len(pos, eval_seq_len, "--eval-seq-len", model)
    out = Path(out)
    if resume and not (out / "checkpoint" / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {out / 'checkpoint'} does not exist (no checkpoint to continue)")
    protected = [source if kind in ("dir", "gguf") else None, *_as_list(data), eval_ppl]
    check_out(out, overwrite=overwrite, resume=resume, markers=PRUNE_MARKERS, protected=protected)
    return pos


def _as_list(data) -> list:
    return [data] if isinstance(data, (str, os.PathLike)) else list(data)


def recorded_source(report: dict) -> tuple[str, str]:
    """(kind, source) of the model a prune report names (its recorded absolute source first)."""
    return resolve_model(report.get("model_resolved") or report["model"])


def check_lower(prune_dir, out, *, overwrite: bool):
    """`patchc lower`'s checks; returns the prune report (read and validated)."""
    from patchc.prune_dir import read_prune_dir

    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.resolve() == Path(prune_dir).resolve():
        raise OutputError("--out must differ from the prune folder")
    masks = read_prune_dir(prune_dir)
    kind, source = recorded_source(masks.report)
    check_out(out, overwrite=overwrite, markers=CHECKPOINT_MARKERS, what="--out",
              protected=[prune_dir, source if kind in ("dir", "gguf") else None])
    return masks


def eval_target(spec: str) -> tuple[str, str | None]:
    """-> ("checkpoint" | "prune" | "model", config source for the positions)."""
    d = Path(spec)
    if (d / "manifest.json").is_file():
        return "checkpoint", str(d)
    if (d / "prune.json").is_file():
        return "prune", None
    return "model", None


def check_eval(spec: str, *, device: str, ppl: str | None, zeroshot: str | None, seq_len: int | None,
               out_json: str | None) -> int | None:
    """`patchc eval`'s checks; returns the model's positions (None if unknown)."""
    check_device(device)
    if ppl:
        check_readable([ppl], "--ppl file")
    if zeroshot:
        if not Path(zeroshot).is_dir():
            raise PreflightError(f"--zeroshot {zeroshot} is not a folder of TASK.jsonl files")
        check_readable([zeroshot], "--zeroshot folder")
    if out_json and Path(out_json).is_dir():
        raise PreflightError(f"--json {out_json} is a folder")
    what, cfg_dir = eval_target(spec)
    if what == "checkpoint":
        from patchc.lower import read_manifest

        read_manifest(spec)
        pos = model_positions("dir", cfg_dir)
    elif what == "prune":
        import json

        try:
            rep = json.loads((Path(spec) / "prune.json").read_text())
        except (OSError, ValueError) as e:
            raise PreflightError(f"{Path(spec) / 'prune.json'} cannot be read ({e})") from None
        pos = model_positions(*recorded_source(rep))
    else:
        pos = model_positions(*resolve_model(spec))
    check_seq_len(pos, seq_len, "--seq-len", spec)
    return pos


def check_bench(path: str, *, device: str, out_json: str | None) -> None:
    from patchc.lower import read_manifest

    check_device(device)
    read_manifest(path)
    if out_json and Path(out_json).is_dir():
        raise PreflightError(f"--json {out_json} is a folder")
