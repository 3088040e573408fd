"""Equal results are one result: a build whose rows an intact entry already holds shares its files.

Owns: the content notes (`content/<hash[:2]>/<hash>`: an entry holding that content hash's
rows; a hint, whoever reads it checks the entry it names), linking a new build's Arrow files
that are an intact entry's byte for byte (but for the key in the schema's metadata) to that
entry's (one copy; the other entry's recorded identities renewed), and forgetting the notes of
removed entries (gc).

Must never: link a file that differs from the other entry's but for its key, link into an entry
not checked intact, load a result with another entry's fingerprint, import `datasets`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hfbuild.store import sharing
from hfbuild.store.check import Checks
from hfbuild.store.entry import Manifests, flat, identity
from hfbuild.store.paths import FP, Layout, join


class Equal:
    """The content notes of one store, and the links between equal results."""

    def __init__(self, layout: Layout, manifests: Manifests, checks: Checks) -> None:
        self.layout = layout
        self.manifests = manifests
        self.checks = checks

    def _note_path(self, content_hash: Any) -> str | None:
        if not isinstance(content_hash, str) or not FP.match(content_hash):
            return None
        return os.path.join(self.layout.root, "content", content_hash[:2], content_hash)

    def note(self, fp: str, doc: dict[str, Any]) -> None:
        """Note `fp` as an entry holding its content hash's rows, for `link`; an entry
        without rows of its own (a list of shards, indices into a base) is not noted. A note
        is a hint: whoever reads it checks the entry it names."""
        path = self._note_path(doc.get("content_hash"))
        if (
            path is None
            or doc.get("indices") is not None
            or not any(r.endswith(".arrow") for r in doc.get("files") or {})
        ):
            return
        with contextlib.suppress(OSError):
            sharing.makedirs(os.path.dirname(path))
            sharing.write_text_atomic(path, fp + "\n", durable=False)

    def link(self, data: str, fp: str, manifest: dict[str, Any]) -> None:
        """Equal results are one result: where an intact entry already holds the rows of
        `manifest`'s content hash (a comment, a refactor or an upgrade rebuilt a stage under
        another key to the same data), each of the new build's Arrow files that is that
        entry's byte for byte is replaced by a hard link to it, so the store keeps one copy.
        A link changes the file's ctime: the other entry's recorded identities are renewed
        (they held before the link, so its files are what it checked). Where linking fails
        (another filesystem, another user's file), the copy stays: only space is lost. The
        linked file names the first entry's key in its schema's metadata (`_same_rows_file`):
        a result is loaded with its own `state.json`'s fingerprint, never that one."""
        note = self._note_path(manifest.get("content_hash"))
        if note is None:
            return
        try:
            with open(note, encoding="utf-8") as f:
                other = f.read().strip()
        except OSError:
            return
        if other == fp or not FP.match(other):
            return
        there = self.checks.intact_manifest(other)
        if there is None or there.get("content_hash") != manifest.get("content_hash"):
            return
        if there.get("files") and not self.checks.knows(other):
            return
        theirs = self.layout.data_of(other)
        own = self.manifests.ids(other).get("own")
        if not isinstance(own, dict):
            return
        renewed = dict(own)
        for rel, size in there["files"].items():
            mine = join(data, rel)
            old = join(theirs, rel)
            if not rel.endswith(".arrow") or not isinstance(own.get(rel), list):
                continue
            try:
                if os.lstat(mine).st_size != size or not _same_rows_file(old, mine, other, fp):
                    continue
                tmp = mine + ".link"
                os.link(old, tmp)
                os.replace(tmp, mine)
                st = os.stat(old)
            except OSError:
                continue
            renewed[rel] = [*identity(st), *own[rel][4:]]
        if renewed != own:
            self.manifests.write_ids(other, {**self.manifests.ids(other), "own": renewed})
            self.checks.renewed(other, flat(there["files"], renewed) or ())

    def forget(self, removed: set[str]) -> None:
        """Remove the content notes (`note`) naming an entry that is gone or being
        removed (bookkeeping, not reported); the entries that shared its files keep them
        (hard links)."""
        top = os.path.join(self.layout.root, "content")
        for sub in sorted(os.listdir(top)) if os.path.isdir(top) else []:
            d = os.path.join(top, sub)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                path = os.path.join(d, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        fp = f.read().strip()
                except OSError:
                    continue
                if FP.match(fp) and fp not in removed and os.path.isdir(self.layout.entry(fp)):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _same_rows_file(old: str, new: str, old_key: str, new_key: str) -> bool:
    """Whether the Arrow stream file `new` is `old` byte for byte, but for the key datasets
    writes into the schema's metadata (`"fingerprint"`, the entry's key: hfbuild builds with
    `new_fingerprint=key`), which only the schema message (the stream's first) may hold."""
    chunk = 1 << 20
    with open(old, "rb") as a, open(new, "rb") as b:
        head = a.read(8)
        if head[:4] != b"\xff\xff\xff\xff" or head != b.read(8):
            return False
        n = int.from_bytes(head[4:8], "little")  # the schema message's length
        if n > 64 * chunk:
            return False
        if a.read(n).replace(old_key.encode(), new_key.encode()) != b.read(n):
            return False
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if x != y:
                return False
            if not x:
                return True
