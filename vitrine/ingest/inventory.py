"""The inventory of the sources folder: what collect's DVC dependency is, instead of the folder.

DVC hashes a dependency folder by walking it and reading every file it finds, following
symbolic links. On a seller's folder that walk dies before collect ever runs: a symbolic-link
loop is an error ("Too many levels of symbolic links"), a file name that is not UTF-8 another
(DVC cannot encode it), and a named pipe blocks the walk forever, waiting for a writer. collect
itself accounts for each of these as one quarantined record, so the stage depends instead on
this listing, written by the `inventory` stage on every `dvc repro` (it is `always_changed`):
collect re-runs exactly when the listing changes.

One line per entry under the root, sorted by path, tab-separated:

    <path>  <kind>  <size>  <content>

path: relative, with `/`; a name that is not UTF-8 shown with \\xNN escapes (as the manifest
shows it). kind: file, dir, symlink, fifo, socket, device, unreadable. content: a regular file's
sha256 (read in chunks, never whole), a symbolic link's target (never followed), an unreadable
entry's error; empty otherwise. Nothing is opened but regular files, and none is followed out
of the root, so the walk neither blocks nor loops.

Every file is hashed on every run: the bundled archive (7 MB) in 16 ms, a folder of 20,000
photos of 3 kB in 0.7 s (page cache warm, 2-core AMD EPYC), about what DVC's own hashing of
that folder costs (0.8 s, benchmarks/collect_repro.py).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from vitrine.ingest.records import escaped

CHUNK = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _sha256(path: str) -> str:
    # O_NONBLOCK: should the file have become a FIFO since it was listed, opening never waits.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return ""
        digest = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        return digest.hexdigest()


def _field(text: str) -> str:
    """A name or error as one TSV field: valid UTF-8, no tab or line break."""
    return escaped(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def entries(root: Path) -> Iterator[tuple[str, str, int, str]]:
    """(path, kind, size, content) for every entry under root, in path order (a folder, then
    what it holds). An explicit stack rather than recursion: a tree may be deeper than
    Python's recursion limit."""
    stack = [_listed(root, "")]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry[1] == "dir":
            stack.append(_listed(root, entry[0]))


def _listed(root: Path, folder: str) -> Iterator[tuple[str, str, int, str]]:
    """A folder's entries, sorted by name; an unlistable folder as one `unreadable` entry."""
    try:
        with os.scandir(os.path.join(root, folder) if folder else root) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as err:
        yield f"{folder}/", "unreadable", 0, f"{type(err).__name__}: {err.strerror}"
        return
    for item in found:
        yield _entry(item, f"{folder}/{item.name}" if folder else item.name)


def _entry(entry: os.DirEntry[str], rel: str) -> tuple[str, str, int, str]:
    try:
        info = entry.stat(follow_symlinks=False)
        kind = _kind(info.st_mode)
        if kind == "symlink":
            return rel, kind, 0, os.readlink(entry.path)
        if kind == "file":
            return rel, kind, info.st_size, _sha256(entry.path)
        return rel, kind, 0, ""
    except OSError as err:
        return rel, "unreadable", 0, f"{type(err).__name__}: {err.strerror}"


def listing(root: Path) -> Iterator[str]:
    """The inventory's lines (see the module docstring); a root that is not a folder lists as
    one line saying so."""
    if not root.is_dir():
        yield f"\t{'not_a_folder' if os.path.lexists(root) else 'missing'}\t0\t\n"
        return
    for rel, kind, size, content in entries(root):
        yield f"{_field(rel)}\t{kind}\t{size}\t{_field(content)}\n"


def write_inventory(root: Path, out: Path) -> int:
    """Write root's inventory to out (atomically); the number of entries."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for line in listing(root):
            fh.write(line)
            n += 1
    tmp.replace(out)
    return n


def inventory_digest(root: Path) -> str:
    """sha256 of root's inventory: changes exactly when the inventory would."""
    digest = hashlib.sha256()
    for line in listing(root):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()
