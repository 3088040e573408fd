"""The small records a store keeps beside its entries: refs, run-time reads, failed builds.

Owns: `Records`: `refs/<stage>`, the last fingerprint built under each stage name (written
only when it changes, atomically); `observed/<fp[:2]>/<fp>.json`, the path sets builds of a
static fingerprint read at run time (newest first, at most 16; see `fullkey.py`);
`failures/<fp[:2]>/<fp>.json`, the error the last build of a key failed with (for `status` and
`explain`, until one succeeds: `clear_failure`).

Must never: record a path `safe_observed` refuses or hand one out, keep more of a failure's
message than `_FAILURE_CHARS`, import `datasets`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from hfbuild.store import sharing
from hfbuild.store.paths import FP, Layout, check_fp, permission_hint, safe_observed

_FAILURE_CHARS = 8000  # of a failed build's message kept for `status` and `explain`


class Records:
    """The refs, observed read sets and failure records of the store at `layout`."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def read_observed(self, static_fp: str) -> list[list[str]]:
        """The path sets builds of `static_fp` read at run time, newest first; [] if none."""
        try:
            with open(self.layout.observed_path(static_fp), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return []
        sets = doc.get("sets") if isinstance(doc, dict) else None
        if not isinstance(sets, list):
            return []
        return [
            list(s)
            for s in sets
            if isinstance(s, list) and s and all(isinstance(p, str) and safe_observed(p) for p in s)
        ]

    def add_observed(self, static_fp: str, paths: list[str]) -> None:
        """Record that a build of `static_fp` read `paths` (kept newest first, at most 16
        sets). Call with the static fingerprint's build lock held."""
        self.layout.ensure()
        sets = [s for s in self.read_observed(static_fp) if s != paths]
        path = self.layout.observed_path(static_fp)
        sharing.makedirs(os.path.dirname(path))
        sharing.write_json_atomic(path, {"sets": [paths, *sets][:16]})

    def record_failure(self, fp: str, stage: str, error: str) -> None:
        """Record that building `stage` under key `fp` failed with `error` (what `status`
        and `explain` then say instead of "never built"); a later success removes it."""
        self.layout.ensure()
        path = self.layout.failure_path(fp)
        sharing.makedirs(os.path.dirname(path))
        doc = {"stage": stage, "error": error[:_FAILURE_CHARS]}
        sharing.write_json_atomic(path, doc, durable=False)

    def read_failure(self, fp: str) -> str | None:
        """The error a build of `fp` last failed with, if one did and none succeeded since."""
        try:
            with open(self.layout.failure_path(fp), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        return error if isinstance(error, str) else None

    def clear_failure(self, fp: str) -> None:
        """Forget a failed build of `fp` (it was built or pulled since)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.failure_path(fp))

    def set_ref(self, stage: str, fp: str) -> None:
        """Point `refs/<stage>` at `fp` (atomically; nothing is written when it does)."""
        if self.get_ref(stage) == fp:  # the common case (a no-op run): one small read
            return
        self.layout.ensure()
        path = self.layout.ref_path(stage)
        if self.get_ref(stage) == fp:
            return
        with permission_hint(self.layout.root):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            os.fchmod(fd, sharing.file_mode(os.path.dirname(tmp)))
            with os.fdopen(fd, "w") as f:
                f.write(check_fp(fp) + "\n")
            os.replace(tmp, path)

    def get_ref(self, stage: str) -> str | None:
        """The fingerprint last built under `stage`, if any."""
        try:
            with open(self.layout.ref_path(stage)) as f:
                fp = f.read().strip()
        except OSError:
            return None
        return fp if FP.match(fp) else None
