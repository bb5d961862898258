"""Output folders: one run per folder, never overwritten by accident.

Every subcommand writes into its own default folder (runs/train, runs/eval, runs/wise-ft,
runs/demo), so `train` then `eval` never replace each other's results. A command refuses a folder
that already holds a run's outputs unless it is told to continue that run (`train --resume`) or to
replace it (`--overwrite`, which removes exactly the files that command writes: never a user's
other files, never a checkpoint that `eval` / `wise-ft` may be reading). Folders holding only
other files are used as they are."""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from pathlib import Path

from . import checkpoint

log = logging.getLogger("calrft.rundir")

DEFAULT_OUT = {"train": "runs/train", "eval": "runs/eval", "wise-ft": "runs/wise-ft", "demo": "runs/demo"}
# What each command writes into its folder (glob patterns).
REPORT_FILES = ("results.json", "report.md", "reliability_*.png", "comparison.png", "wiseft.png")
WRITES = {
    "train": ("checkpoint.pt", "log.jsonl") + REPORT_FILES,
    "eval": REPORT_FILES,
    "wise-ft": REPORT_FILES,
    "demo": ("checkpoint.pt", "log.jsonl", "summary.md", "summary.json") + REPORT_FILES,
}
RUN_FILES = tuple(dict.fromkeys(p for patterns in WRITES.values() for p in patterns))
# The demo writes one folder per method (and per seed when several): look that deep.
DEMO_SUBFOLDERS = ("flyp", "carot", "seed*")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def run_outputs(out, patterns=RUN_FILES, subfolders=()) -> list[Path]:
    """The files in `out` (and in its `subfolders`, glob patterns, recursively) whose names match
    `patterns`."""
    out = Path(out)
    found = []
    if not out.is_dir():
        return found
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and _matches(entry.name, patterns):
            found.append(Path(entry.path))
        elif entry.is_dir(follow_symlinks=False) and _matches(entry.name, subfolders):
            found += run_outputs(entry.path, patterns, subfolders)
    return found


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out: cannot create folder {str(out)!r} ({exc.strerror or exc})") from None
    try:
        probe_write(out)
    except OSError as exc:
        raise ValueError(f"out: folder {str(out)!r} is not writable ({exc.strerror or exc})") from None


def probe_write(out: Path) -> None:
    """Create and remove a file in `out` (raises OSError when the folder is read-only)."""
    fd, name = tempfile.mkstemp(dir=out, prefix=".calrft-write-probe.")
    os.close(fd)
    os.unlink(name)


def prepare(out, command: str, *, resume=None, overwrite: bool = False, inputs: dict | None = None,
            main: bool = True) -> None:
    """Make `out` ready for `command`, or raise ValueError: it must be (or become) a writable
    folder. If it holds a run's outputs, `resume` (the checkpoint being resumed) keeps them when it
    lies in `out` (a run continues in its own folder, never over another run), and `overwrite`
    removes what `command` writes, unless one of those files is among the command's `inputs`
    ({option: path}, e.g. the --pretrained checkpoint). Stale temporary files of an interrupted
    write are removed. Only the main process (`main`) changes anything."""
    if command not in WRITES:
        raise ValueError(f"command: unknown {command!r}")
    if resume and overwrite:
        raise ValueError("overwrite: --overwrite and --resume exclude each other")
    out = Path(out)
    subfolders = DEMO_SUBFOLDERS if command == "demo" else ()
    existing = run_outputs(out, RUN_FILES, subfolders)
    names = ", ".join(str(p.relative_to(out)) for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
    if existing and not (resume or overwrite):
        hint = "--resume CHECKPOINT to continue it, " if command == "train" else ""
        raise ValueError(f"out: {str(out)!r} already holds a run ({names}); pass {hint}--overwrite to "
                         "replace it, or choose another --out")
    if existing and isinstance(resume, (str, os.PathLike)) and \
            os.path.realpath(Path(resume).parent) != os.path.realpath(out):
        raise ValueError(f"out: {str(out)!r} holds another run ({names}); a resumed run continues in "
                         f"its checkpoint's folder ({str(Path(resume).parent)!r}) or in a folder without a run")
    doomed = run_outputs(out, WRITES[command], subfolders) if overwrite else []
    read = {os.path.realpath(p): option for option, p in (inputs or {}).items()
            if isinstance(p, (str, os.PathLike)) and p and os.path.exists(p)}
    for path in doomed:
        if os.path.realpath(path) in read:
            raise ValueError(f"overwrite: --overwrite would remove {str(path)!r}, which "
                             f"--{read[os.path.realpath(path)].replace('_', '-')} reads; copy it "
                             "elsewhere or choose another --out")
    if not main:
        return
    _check_writable(out)
    if doomed:
        for path in doomed:
            path.unlink()
        log.info("--overwrite: removed %d files of the previous run in %s", len(doomed), out)
    stale = checkpoint.clean_stale_temps(out)
    for sub in (p for p in out.iterdir() if p.is_dir() and _matches(p.name, subfolders)):
        stale += checkpoint.clean_stale_temps(sub)
    if stale:
        log.warning("removed %d temporary files of an interrupted write in %s", len(stale), out)


def truncate_log(path, step: int) -> int:
    """Drop the records of a JSON-lines log written after `step` (a resumed run replays those
    steps); returns how many were dropped. Unparseable lines (a write cut by a crash) go too."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
