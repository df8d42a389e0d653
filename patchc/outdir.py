"""Output folders that never replace what they should not.

A run writes into a temporary folder beside its output, named `.NAME.tmp-PID-XXXX`, and renames it into
place when complete:
- no overwrite: an atomic no-replace rename (renameat2 RENAME_NOREPLACE, or an os.mkdir reservation where
  the kernel or file system lacks it): an output that appeared meanwhile is never replaced;
- overwrite: only a folder that carries one of patchc's marker files (prune.json, manifest.json, ...) is
  replaced, after the new one is complete (old -> `.NAME.old-PID-XXXX`, new -> NAME, old removed);
- a temporary folder whose process is gone (killed run) is removed by the next run beside it.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

PRUNE_MARKERS = ("prune.json", "checkpoint/state.json", "checkpoint.safetensors")
CHECKPOINT_MARKERS = ("manifest.json", "patchc.json")


class OutputError(ValueError):
    """An output folder patchc refuses to create or replace."""


def is_patchc_output(path: Path, markers: tuple[str, ...]) -> bool:
    return path.is_dir() and not path.is_symlink() and any((path / m).is_file() for m in markers)


def overlaps(a: Path, b: Path) -> bool:
    """a and b are the same path, or one lies inside the other (resolved, symlinks followed)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def _temp_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_temp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir(mode=0o777)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path, own: bool = False) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` folders beside `out` whose process is gone (own: this process's too, left by
    an earlier run that raised); an orphaned `.NAME.old-PID-*` (a replacement killed between its two renames)
    is put back as NAME if NAME is missing, else removed. Returns what was removed or restored."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    done = []
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m.group(2))
        if _pid_alive(pid) and not (own and pid == os.getpid()):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


_libc = None


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """True if renamed; False if renameat2 is unavailable here; FileExistsError if dst exists."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - glibc >= 2.28
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    at_fdcwd, rename_noreplace = -100, 1
    rc = _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, f"{dst} appeared while patchc was writing it; left as it is", dst)
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), src)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename folder src to dst, failing with FileExistsError if dst exists, atomically."""
    if _renameat2_noreplace(str(src), str(dst)):
        return
    os.mkdir(dst)  # the reservation: atomic, fails if dst exists
    try:
        os.rename(src, dst)  # replaces only our empty reservation; ENOTEMPTY if something was put in it
    except OSError as e:
        try:
            os.rmdir(dst)
        except OSError:
            pass
        raise FileExistsError(errno.EEXIST, f"{dst} appeared while patchc was writing it; left as it is",
                              str(dst)) from e


def publish(tmp: Path, out: Path, overwrite: bool, markers: tuple[str, ...]) -> None:
    """Move the finished `tmp` to `out`; with overwrite, replace `out` only if it is a patchc output."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        os.rmdir(out)  # an empty folder holds nothing to lose (a race re-creating it fails the rename below)
    if not os.path.lexists(out):
        rename_noreplace(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared while patchc was writing it; left as it is "
                              f"(pass --overwrite to replace it)")
    if not is_patchc_output(out, markers):
        raise OutputError(f"{out} is not a patchc output (none of {', '.join(markers)}): not replacing it")
    old = _temp_name(out, "old")
    os.rename(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path, *, overwrite: bool, markers: tuple[str, ...], protected=(), resume: bool = False,
              what: str = "output folder") -> None:
    """Refuse an --out that is a file, exists without --overwrite (or --resume), is not a patchc output when
    it would be replaced, or overlaps a path the run reads (model source, data, prune folder)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a folder")
    for p in protected:
        if p is None:
            continue
        p = Path(p)
        if not os.path.lexists(p):
            continue
        inside = p.resolve() in out.resolve().parents  # out lies inside p (e.g. a run folder in the model's)
        # out == p or out contains p: refused always; out inside p: refused only when it would be replaced
        if overlaps(out, p) and (not inside or (overwrite and out.exists())):
            raise OutputError(f"{what} {out} overlaps {p}, which this run reads: choose another --out")
    exists = out.is_dir() and any(out.iterdir())
    if resume or not exists:
        return
    if not overwrite:
        raise FileExistsError(f"{what} {out} exists and is not empty: pass --overwrite to replace it"
                              + (" or --resume to continue its run" if "prune.json" in markers else ""))
    if out.is_symlink() or not is_patchc_output(out, markers):
        raise OutputError(f"{what} {out} is not a patchc output (it has none of {', '.join(markers)}): "
                          "--overwrite replaces only an earlier patchc output; remove it yourself or choose another --out")


def stage_prune_output(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """The folder `patchc prune` writes into: `out` itself for a new run or --resume; a temporary folder beside
    it when it replaces an earlier run (finish_prune_output swaps it in once the new result is complete, so a
    failed run leaves the earlier one untouched). check_out has validated `out` before."""
    out = Path(out)
    clean_stale(out, own=True)
    if not resume and overwrite and out.is_dir() and any(out.iterdir()):
        tmp = make_temp_dir(out)
        _UNFINISHED.add(tmp)
        return tmp
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish_prune_output(work: Path, out: Path) -> Path:
    out = Path(out)
    if Path(work) != out:
        publish(Path(work), out, overwrite=True, markers=PRUNE_MARKERS)
        _UNFINISHED.discard(Path(work))
    return out


_UNFINISHED: set[Path] = set()  # replacement runs not finished (raised): removed when Python exits


@atexit.register
def _remove_unfinished() -> None:
    for p in _UNFINISHED:
        shutil.rmtree(p, ignore_errors=True)
