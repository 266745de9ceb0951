"""Which files a run reads: the Parquet files under its inputs, each real file once.

Only regular files are read. Inside an input folder, a symbolic link (to a file or a folder)
is refused with a SourceError unless `follow_links` is on: a link back to a parent folder, or
to a file already listed, would otherwise make rows count twice (or forty times), and a link
to a system folder would walk into it. With `follow_links`, what a link points to is read,
each real file once (identity: device and inode, so hard links and overlapping inputs count
once too) and each real folder walked once (a link cycle ends there); a file read through a
link is named by its resolved path. An input the caller names itself is read even when it
is a link (a `current -> 2026-12-01` folder is a common way to name a snapshot).

Object stores have no links: their listing is pyarrow's recursive one.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from vecpress.pipeline import storage
from vecpress.pipeline.errors import SourceError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
#: links (or other entries) a refusal names before "... and N more"
MAX_NAMED = 3


@dataclass
class Listing:
    """The files found, sorted: URI -> modification time (ns, or None where unknown), and
    what the walk did with links and second names of a file already found."""

    files: dict[str, int | None] = field(default_factory=dict)
    #: (link as found, resolved real file read) for every file read through a link
    links: list[tuple[str, str]] = field(default_factory=list)
    #: (path not read, URI read instead): a real file reached a second time
    aliases: list[tuple[str, str]] = field(default_factory=list)


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_parquet(name: str) -> bool:
    return name.endswith(PARQUET_SUFFIXES)


def _named(items: list[str]) -> str:
    more = len(items) - MAX_NAMED
    return ", ".join(items[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


class _LocalWalk:
    """Walks local inputs by os.scandir, never following a link unless asked (pyarrow's
    recursive listing follows every one, and loops on a cycle until the path is too long)."""

    def __init__(self, follow_links: bool):
        self.follow_links = follow_links
        self.files: dict[tuple[int, int], tuple[str, int, bool, str]] = {}  # (dev, ino) -> (uri, mtime, via link, as found)
        self.dirs: set[tuple[int, int]] = set()
        self.links: list[str] = []  # refused
        self.special: list[str] = []  # refused: not regular files
        self.aliases: list[tuple[str, str]] = []

    def add_file(self, path: str, st: os.stat_result, via_link: bool) -> None:
        """A real file, by (device, inode), once: of its names, one found without a link
        before one through a link, then the smallest."""
        key = (st.st_dev, st.st_ino)
        new = (os.path.realpath(path) if via_link else path, st.st_mtime_ns, via_link, path)
        old = self.files.get(key)
        if old is None:
            self.files[key] = new
            return
        if (new[2], new[0]) < (old[2], old[0]):
            self.files[key], new, old = new, old, new
        if new[3] != old[0]:
            self.aliases.append((new[3], old[0]))

    def walk_input(self, path: str) -> None:
        try:
            st = os.stat(path)  # (an input named by the caller is followed if it is a link)
        except FileNotFoundError as exc:
            raise SourceError(f"{path}: input does not exist") from exc
        except OSError as exc:
            raise SourceError(f"{path}: cannot access input: {exc.strerror or exc}") from exc
        if stat.S_ISREG(st.st_mode):
            self.add_file(path, st, via_link=False)
        elif stat.S_ISDIR(st.st_mode):
            self.walk_dir(path, st, via_link=False)
        else:
            raise SourceError(f"{path}: input is not a regular file or a folder ({_kind(st.st_mode)}): "
                              "vecpress reads regular Parquet files only")

    def walk_dir(self, path: str, st: os.stat_result, via_link: bool) -> None:
        stack = [(path, st, via_link)]
        while stack:
            folder, fst, linked = stack.pop()
            key = (fst.st_dev, fst.st_ino)
            if key in self.dirs:  # a folder reached again (a link cycle, or two links to it)
                continue
            self.dirs.add(key)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise SourceError(f"{folder}: cannot list input folder: {exc.strerror or exc}") from exc
            subfolders = []
            for e in entries:
                if _hidden(e.name):
                    continue
                if e.is_symlink():
                    if not self.follow_links:
                        if _is_parquet(e.name) or _points_to_dir(e.path):
                            self.links.append(f"{e.path} -> {os.readlink(e.path)}")
                        continue
                    try:
                        est = os.stat(e.path)
                    except OSError as exc:  # a dangling link, or a cycle of links
                        if _is_parquet(e.name):
                            raise SourceError(f"{e.path}: link to {os.readlink(e.path)} cannot be followed: "
                                              f"{exc.strerror or exc}") from exc
                        continue
                    entry_linked = True
                else:
                    try:
                        est = e.stat(follow_symlinks=False)
                    except OSError as exc:
                        raise SourceError(f"{e.path}: cannot access: {exc.strerror or exc}") from exc
                    entry_linked = linked
                if stat.S_ISDIR(est.st_mode):
                    subfolders.append((e.path, est, entry_linked))
                elif not _is_parquet(e.name):
                    continue
                elif stat.S_ISREG(est.st_mode):
                    self.add_file(e.path, est, entry_linked)
                else:
                    self.special.append(f"{e.path} ({_kind(est.st_mode)})")
            stack.extend(reversed(subfolders))  # (walked in name order)

    def listing(self) -> Listing:
        if self.links:
            raise SourceError(f"{len(self.links)} symbolic link(s) inside the input: {_named(sorted(self.links))}; "
                              "vecpress reads only regular files: replace the links by the files, or pass "
                              "--follow-links to read what they point to (each real file once)")
        if self.special:
            raise SourceError(f"{len(self.special)} input entries are not regular files: {_named(sorted(self.special))}; "
                              "vecpress reads regular Parquet files only")
        out = Listing()
        for uri, mtime, via_link, found in self.files.values():
            out.files[uri] = mtime
            if via_link:
                out.links.append((found, uri))
        out.files = dict(sorted(out.files.items()))
        out.links.sort()
        out.aliases = sorted(self.aliases)
        return out


def _points_to_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character "
                       "device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def list_inputs(uris, *, follow_links: bool = False) -> Listing:
    """The Parquet files under the given files and folders (local paths or URIs), sorted,
    hidden files (names starting with '.' or '_') skipped, each real file once."""
    local = _LocalWalk(follow_links)
    remote: dict[str, int | None] = {}
    for uri in uris:
        loc = storage.resolve(uri)
        if not loc.scheme:
            local.walk_input(loc.path)
            continue
        try:
            info = loc.fs.get_file_info(loc.path)
        except OSError as exc:
            raise SourceError(f"{uri}: cannot access input: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{uri}: input does not exist")
        if info.type == pafs.FileType.File:
            remote[loc.uri_for(loc.path)] = info.mtime_ns
            continue
        for fi in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
            rel = posixpath.relpath(fi.path, loc.path)
            if fi.type == pafs.FileType.File and not any(_hidden(p) for p in rel.split("/")) and _is_parquet(fi.path):
                remote[loc.uri_for(fi.path)] = fi.mtime_ns
    out = local.listing()
    out.files = dict(sorted({**out.files, **remote}.items()))
    if not out.files:
        raise SourceError(f"no Parquet files found in {', '.join(map(str, uris))}")
    return out
