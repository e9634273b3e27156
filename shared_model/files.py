"""Files that survive a crash: whole-file replacement, appends, and JSON Lines read back.

A replaced file goes to a temporary file in the target's folder, named
`.NAME.tmp-PID-TOKEN`, which is flushed and fsynced, renamed over the target, and then the
folder is fsynced: a crash at any moment (power loss included) leaves the old file or the
new one, never half. A writer killed between its write and its rename (kill -9) leaves its
temporary file behind; the next write into that folder removes the temporary files of
processes that no longer run.

JSON Lines are append-only logs: a crash can tear only the last line. `read_jsonl` drops a
torn last line with a warning where the caller says that is safe (metrics redone on
resume), and otherwise fails, as it does for any bad line before the last, naming file:line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


class JsonLinesError(ValueError):
    """A JSON Lines file (or record) with a line that is not JSON; the message names file:line."""


class JsonLine(NamedTuple):
    where: str  # "path:line", for messages about this line's content
    value: Any


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable: fsyncing the file does not."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files in `folder` whose writer no longer runs (killed mid-write)."""
    for path in Path(folder).glob(".*.tmp-*"):
        match = TEMP_NAME.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _process_runs(int(match.group(1))):
            path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes, private: bool = False, exclusive: bool = False) -> bool:
    """Replace `path` with `data`, durably and all at once. private: readable by the owner
    only (from its first byte). exclusive: never replace an existing file; returns False
    (and writes nothing) when `path` exists, so concurrent creators agree on the first one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(partial, path)  # fails if another process created it first
            except FileExistsError:
                return False
        else:
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return True


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append whole lines and fsync (the file, and the folder of a new file) before returning:
    what a caller logs before acting on it is on disk. No lines: the file is left as it is."""
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_folder(path.parent)


def parse_json_lines(lines: list[str], where: str, drop_torn_tail: bool = False) -> list[JsonLine]:
    """Each non-blank line parsed, with its "where:line". A line that is not JSON is an error,
    unless it is the last one and drop_torn_tail (a crash mid-append): dropped, with a warning."""
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    out = []
    for i, (line_no, line) in enumerate(numbered):
        try:
            out.append(JsonLine(f"{where}:{line_no}", json.loads(line)))
        except json.JSONDecodeError as error:
            if drop_torn_tail and i == len(numbered) - 1:
                log.warning("%s:%d: dropping a torn last line (a crash mid-write): %r", where, line_no, line[:80])
                break
            raise JsonLinesError(f"{where}:{line_no}: not JSON (a torn or edited line?): {error}") from None
    return out


def read_jsonl(path: str | os.PathLike, drop_torn_tail: bool = False) -> list[JsonLine]:
    """The lines of a JSON Lines file (an absent file has none); see `parse_json_lines`."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_json_lines(path.read_text(encoding="utf-8").split("\n"), str(path), drop_torn_tail)
