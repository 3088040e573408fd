"""The two-level key of a stage that used files at run time (ccache's "direct mode").

A stage's *static* fingerprint is the digest of its manifest (code, arguments, inputs, data).
What its build was seen to read or import at run time (`observe`: files, and environment
variables read by computed names, entered as `env://NAME`, envvars.py) is recorded, keyed by the
static fingerprint, as a list of repo-relative paths: in the store (`observed/`) and in the
stage's hfbuild.lock entry. The *full* key is `f(static fingerprint, [path, content id] of
each file read)`; a stage that read nothing keeps its static fingerprint as its key, exactly
as before run-time observation existed.

Owns: the full key; choosing a stage's current key from the recorded path sets (the one whose
result the store holds, else the most recent, so a fresh clone finds a remote's entry); and
turning what one build recorded into [path, id] pairs, leaving out what the static key
already holds (closure files, data files, file_deps) and what is not project content (the
store, environments, `.git`, and what hfbuild, doit and git read for themselves). A
directory the build listed is the pair [`dir/.`, digest of its names] (`.` for the root);
its names go into the stored manifest (`listings`) for `explain`. A build whose reads are not
all known (`watch.Window.unknown`) gets the pair [UNOBSERVED, `unknown`], which only the
process that built it computes again. In a Ray worker's tree (`Place.listed`), a listing of
a folder the tree does not hold with its names stops the build (`UnshippedListingError`).

Must never: put an absolute path in a key, change the key of a stage nothing recorded
anything for, let another process find a build with unknown reads up to date, key a Ray
worker's listing of a folder its tree does not hold as the project's, or decide freshness
from anything but the store holding the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.core import canonical
from hfbuild.core.errors import ObservationWarning, UnshippedListingError
from hfbuild.core.spec import split_order
from hfbuild.keys.argpaths import named_files
from hfbuild.keys.diff import Change, diff_observed
from hfbuild.keys.manifest import Manifest, Observed
from hfbuild.source import envvars, observe
from hfbuild.source.datafiles import StatCache, file_identity
from hfbuild.source.gitstate import Snapshot
from hfbuild.store import lockfile
from hfbuild.store.paths import safe_observed

if TYPE_CHECKING:
    from hfbuild.keys.place import Place
    from hfbuild.source.recording import Recording
    from hfbuild.store.store import Store

MISSING = "missing"  # the id of a recorded file that no longer exists
# A build whose reads are not all known (inotify lost events, `watch.py`) records this path
# with the id UNKNOWN, which nothing computes later (identify gives it MISSING): no other
# process finds the result as up to date. The process that built it does (`_unsure`), so the
# stages after it in the same run take it as their input.
UNOBSERVED = "?reads-not-all-observed"
UNKNOWN = "unknown"

_unsure: set[str] = set()  # static fingerprints this process built with unknown reads

# Names a directory listing leaves out: git's and Python's own, hfbuild's default store, the
# lock files of every pipeline (`*.lock`: `Pipeline(lock=...)` names any) and doit's databases
# of any name (`.doit*`: `--db-file`); none is what a transform lists for, and another
# pipeline building in the same project writes them (a listing inotify saw is anyone's).
_NOT_LISTED = (".git", "__pycache__", ".hfbuild")


def _tool_state(name: str) -> bool:
    """A pipeline's lock (any `*.lock`; `.tmp-*.hfbuild` while `write_text_atomic` writes it)
    or a doit database of any name: hfbuild's and doit's state, which other builders write."""
    tmp = name.startswith(".tmp-") and name.endswith(".hfbuild")
    return name.endswith(".lock") or name.startswith(".doit") or tmp


def _listed(name: str) -> bool:
    return name not in _NOT_LISTED and not _tool_state(name)


def is_listing(rel: str) -> bool:
    """Whether a recorded path names a directory listed (`dir/.`, `.` for the root)."""
    return rel == "." or rel.endswith("/.")


def listing_dir(rel: str) -> str:
    """The directory a listing path names (`.` for the root)."""
    return rel[:-2] if rel.endswith("/.") else rel


def listing(full: str) -> list[str] | None:
    """The sorted names in a directory as a listing records them (None: not a directory)."""
    try:
        names = os.listdir(full)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return sorted(n for n in names if _listed(n))


def listing_at(rel: str, snap: Snapshot) -> list[str] | None:
    """The sorted names in the project directory `rel` (a listing's `listing_dir`) as
    `snap` sees them: on disk in a work tree; as the index holds them in index mode (a
    commit's directory: `Snapshot.staged_names`), so `verify --staged` checks the listing
    a commit would hold."""
    if snap.mode != "index":
        return listing(snap.abspath(rel))
    names = snap.staged_names(rel)
    if names is None:
        return None
    return [n for n in names if _listed(n)]


def listing_id(names: list[str] | None) -> str:
    if names is None:
        return MISSING
    return "listing:" + canonical.digest(canonical.dumps(names).encode())


def identify(
    paths: Iterable[str],
    snap: Snapshot,
    cache: StatCache,
    environ: Mapping[str, str] | None = None,
    *,
    unsure: bool = False,
) -> Observed:
    """The current [path, content id] of repo-relative paths (`missing` when gone); a
    listed directory's is the digest of its names (always as on disk); the marker of unknown
    reads is `unknown` only with `unsure` (the process that built it), else `missing`; a
    variable read at run time (`env://NAME`) by its value in `environ` (else the process's
    environment), as envvars.py keys it."""
    out = []
    for rel in sorted(set(paths)):
        if rel == UNOBSERVED:
            out.append((rel, UNKNOWN if unsure else MISSING))
            continue
        name = envvars.observed_name(rel)
        if name is not None:
            env = os.environ if environ is None else environ
            out.append((rel, envvars.observed_id(name, env, snap.root)))
            continue
        full = snap.abspath(rel)
        if is_listing(rel):
            out.append((rel, listing_id(listing_at(listing_dir(rel), snap))))
        elif os.path.isfile(full) or (snap.mode == "index" and snap.exists(rel)):
            out.append((rel, file_identity(full, snap, cache)[1]))
        else:
            out.append((rel, MISSING))
    return tuple(out)


# -- choosing the current key -----------------------------------------------------------------


def _lock(path: str) -> dict[str, Any]:
    """hfbuild.lock's stages (parsed once per version of the file, shared with the ledger)."""
    try:
        return lockfile.read_cached(path)
    except lockfile.ConflictedLockError:
        # Reported by status/verify and rewritten by a build; its entries name no key
        # here (the store's records still do), so a stage may build once more: never wrong.
        return {}


def candidates(static: str, name: str, store: Store, lock_path: str) -> list[tuple[str, ...]]:
    """Path sets recorded for `static`: the store's (newest first), then the lock's."""
    out = [tuple(s) for s in store.read_observed(static)]
    entry = _lock(lock_path).get(name)
    if isinstance(entry, dict) and entry.get("static_fingerprint") == static:
        pairs = entry.get("observed")
        if isinstance(pairs, list):
            paths = tuple(sorted(str(p[0]) for p in pairs if isinstance(p, list) and p))
            if paths and all(safe_observed(p) for p in paths) and paths not in out:
                out.append(paths)
    return out


def resolve(
    m: Manifest, name: str, store: Store, lock_path: str, snap: Snapshot, cache: StatCache
) -> Manifest:
    """`m` with the files its current key includes: none when nothing was ever recorded for
    its static fingerprint or the store holds that fingerprint itself (a build that read
    nothing); else the recorded set whose full key the store holds, else the newest one."""
    static = m.static_fingerprint
    sets = candidates(static, name, store, lock_path)
    if not sets or store.has(m.fingerprint):
        return m
    best: Observed | None = None
    unsure = static in _unsure
    for paths in sets:
        obs = identify(paths, snap, cache, unsure=unsure)
        # The key with these files (a sharded stage's is its shards' keys: shards.py).
        if store.has(dataclasses.replace(m, observed=obs).fingerprint):
            best = obs
            break
        if best is None:
            best = obs
    assert best is not None
    incomplete = m.incomplete
    if any(p.endswith(".py") for p, _ in best):
        # The dynamic import was seen loading a project module: a fact, not a guess.
        incomplete = ()
    return dataclasses.replace(m, observed=best, incomplete=incomplete)


# -- after a build ----------------------------------------------------------------------------


def in_static_key(doc: Mapping[str, Any]) -> set[str]:
    """Repo-relative paths the static manifest already identifies by content (code, file_deps,
    data files, and the files that arguments name)."""
    known = {str(p) for p, _ in (doc.get("code") or {}).get("files", [])}
    known.update(str(p) for p, _ in doc.get("file_deps") or [])
    files = (doc.get("data") or {}).get("files")
    groups: Iterable[Any] = files.values() if isinstance(files, dict) else [files or []]
    for group in groups:
        known.update(str(p) for p, _ in group)
    known.update(p for p, _ in named_files(doc))
    return known


def observed_paths(
    used: Iterable[str],
    doc: Mapping[str, Any],
    snap: Snapshot,
    exclude: Sequence[str],
    verdicts: dict[str, str | None] | None = None,
) -> list[str]:
    """The repo-relative project files among the absolute paths a build used, without
    those its static key holds, git's own files, environments and `exclude` (the store).
    `verdicts` (path -> its repo-relative path, or None when left out) carries what earlier
    calls of the same build decided: a path left out stays left out without being looked
    at again, so a sharded load's calls after each of its files cost what is new."""
    from hfbuild.source.importfind import in_environment

    known: set[str] | None = None
    ex = tuple(os.path.join(os.path.realpath(e), "") for e in exclude if e)
    memo: dict[str, str | None] = {} if verdicts is None else verdicts
    dirs: dict[str, str] = {}  # a directory -> its real path, resolved once a call
    out = set()
    for p in used:
        if p in memo and memo[p] is None:
            continue
        if not os.path.isfile(p):
            continue  # gone already: a temporary file, not an input
        if p in memo:
            rel = memo[p]
        else:
            real = _real(p, dirs)
            rel = None if real.startswith(ex) or in_environment(real, snap.root) else snap.rel(p)
            if rel is not None:
                if known is None:
                    known = in_static_key(doc)
                if rel in known or rel.split("/")[0] == ".git" or _not_input(rel):
                    rel = None
            memo[p] = rel
        if rel is not None:
            out.add(rel)
    return sorted(out)


def _real(path: str, dirs: dict[str, str]) -> str:
    """`os.path.realpath` of an existing file, its directory's resolved once (`dirs`): a
    file that is no symbolic link is its name in its real directory (5,000 data files)."""
    d, base = os.path.split(path)
    if not os.path.isabs(path) or base in ("", os.curdir, os.pardir) or os.path.islink(path):
        return os.path.realpath(path)
    real_dir = dirs.get(d)
    if real_dir is None:
        real_dir = dirs[d] = os.path.realpath(d)
    return os.path.join(real_dir, base)


def _not_input(rel: str) -> bool:
    """Files hfbuild, doit or git read on their own behalf while a build runs (inotify sees
    every process's opens): a pipeline's lock or doit's database at the project's root
    (`_tool_state`: where pipelines keep them; a `*.lock` deeper in is read as any file),
    git's ignore and attribute files (libgit2 reads them to hash a file)."""
    base = rel.rsplit("/", 1)[-1]
    return (
        ("/" not in rel and _tool_state(rel))
        or base.startswith(".doit.db")
        or base in (".gitignore", ".gitattributes", ".gitmodules")
    )


def listed_paths(dirs: Iterable[str], snap: Snapshot, exclude: Sequence[str]) -> list[str]:
    """The recorded paths (`dir/.`) of the project directories among the absolute `dirs` a
    build listed, without the store, `.git` and environments."""
    from hfbuild.source.importfind import in_environment

    ex = tuple(os.path.join(os.path.realpath(e), "") for e in exclude if e)
    out = set()
    for d in dirs:
        real = os.path.realpath(d)
        if os.path.join(real, "").startswith(ex) or in_environment(
            os.path.join(real, "_"), snap.root
        ):
            continue
        if real == snap.root:
            out.add(".")
            continue
        rel = snap.rel(d)
        if rel is None or rel.split("/")[0] == ".git" or "__pycache__" in rel.split("/"):
            continue
        out.add(rel + "/.")
    return sorted(out)


class Seen:
    """What one build used, turned into the stage's observed files."""

    def __init__(self, place: Place, rec: Recording) -> None:
        self._place = place
        self._rec = rec
        self._verdicts: dict[str, str | None] = {}  # see `observed_paths`
        self.listings: dict[str, list[str] | None] = {}  # directory -> its names when identified

    def identify(self, m: Manifest) -> Observed:
        """The project files the build read or imported at run time (and those the modules
        of its closure read when they were imported), with their content ids now, and the
        environment variables project code read that the static key does not hold (with
        the copy mark when it copied the whole environment)."""
        snap = Snapshot(self._place.root)
        closure = [snap.abspath(p) for p, _ in (m.doc.get("code") or {}).get("files", [])]
        # The closure's own files are in the static key: left out before each is judged.
        used = (self._rec.collect() | observe.import_time_uses(closure)).difference(closure)
        _warn_unobserved(m, closure)
        exclude = [self._place.store.root, *_hf_caches()]
        listed = self._rec.collect_listings()  # before git opens directories below
        with self._rec.own_work():  # which are not the build's listings
            return self._identify(m, snap, used, listed, exclude)

    def _identify(
        self, m: Manifest, snap: Snapshot, used: set[str], listed: set[str], exclude: list[str]
    ) -> Observed:
        paths = observed_paths(used, m.doc, snap, exclude, self._verdicts)
        dirs = listed_paths(listed, snap, exclude)
        missed = self._unshipped(dirs)
        if missed:
            raise UnshippedListingError(missed)
        for rel in dirs:
            self.listings[listing_dir(rel)] = listing_at(listing_dir(rel), snap)
        unknown = self._rec.unknown is not None
        static_env = [str(n) for n, _ in m.doc.get("env") or []]
        env = envvars.observed_keyed(self._rec.collect_env(), static_env, snap.root)
        # A variable by the value it had when the build started, not one the build set.
        observed = identify(
            [*paths, *dirs, *([UNOBSERVED] if unknown else [])]
            + [envvars.observed_entry(n) for n in env],
            snap,
            self._place.stat_cache,
            self._rec.env_at_start,
            unsure=unknown,
        )
        self._place.stat_cache.save()
        return observed

    def _unshipped(self, dirs: Iterable[str]) -> list[str]:
        """In a Ray worker's tree (`Place.listed`), the listings among `dirs` of folders the
        tree does not hold with their names (none anywhere else)."""
        shipped = self._place.listed
        return [] if shipped is None else [d for d in dirs if d not in shipped]

    def unshipped(self) -> list[str]:
        """The listings so far of folders a Ray worker's tree does not hold with their names
        (for a build that failed: `os.listdir` of a folder not shipped raises)."""
        if self._place.listed is None:
            return []
        snap = Snapshot(self._place.root)
        exclude = [self._place.store.root, *_hf_caches()]
        return self._unshipped(listed_paths(self._rec.collect_listings(), snap, exclude))

    def publish(self, static: str, observed: Observed) -> None:
        """Remember, under the static fingerprint, which files this build read (one whose
        reads are not all known: in this process only, see UNOBSERVED)."""
        if observed:
            if any(p == UNOBSERVED for p, _ in observed):
                _unsure.add(static)
            self._place.store.add_observed(static, [p for p, _ in observed])

    def listed(self, observed: Observed) -> dict[str, list[str] | None]:
        """The names of the directories `observed` lists, as identified (for `explain`)."""
        dirs = {listing_dir(p) for p, _ in observed if is_listing(p)}
        return {d: self.listings.get(d) for d in sorted(dirs)}


@contextlib.contextmanager
def observing(place: Place, build_dir: str) -> Iterator[Seen]:
    """Record what the block (one stage's build) uses; workers report into `build_dir`. In a
    Ray worker's tree (`Place.listed`), a build that listed a folder the tree does not hold
    with its names raises `UnshippedListingError` (whether it succeeded or failed), so that
    nothing is published under a listing that is not the project's."""
    spool = os.path.join(build_dir, "observed")
    try:
        with observe.recording(place.root, [place.store.root, *_hf_caches()], spool, True) as rec:
            seen = Seen(place, rec)
            try:
                yield seen
            except UnshippedListingError:
                raise
            except Exception as e:
                # On a Ray worker, a build that listed a folder its tree lacks may have failed
                # for that alone: the driver ships the folder and sends the unit again.
                missed = seen.unshipped()
                if missed:
                    raise UnshippedListingError(missed) from e
                raise
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _hf_caches() -> list[str]:
    return [v for k in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE") if (v := os.environ.get(k))]


def _warn_unobserved(m: Manifest, closure: Sequence[str]) -> None:
    """A closure module imported before hfbuild: what it read on import was not seen."""
    if not observe.installed():
        return
    early = {observe.real_module_path(f) for f in observe.preloaded()}
    rels = [p for p, _ in (m.doc.get("code") or {}).get("files", [])]
    late = sorted(
        rel for rel, f in zip(rels, closure, strict=True) if observe.real_module_path(f) in early
    )
    if late:
        warnings.warn(
            f"{', '.join(late)} {'was' if len(late) == 1 else 'were'} imported before hfbuild, "
            f"so files read while importing {'it' if len(late) == 1 else 'them'} are not "
            f"observed: import hfbuild first (in dodo.py, before the project's modules).",
            ObservationWarning,
            stacklevel=4,
        )


def observed_changes(
    recorded: Any, snap: Snapshot, cache: StatCache, listed: Any = None
) -> list[Change]:
    """The files a build recorded reading at run time (`recorded`: [path, id] pairs from a
    stored manifest or the lock) whose content is different now, and the directories it
    listed whose names are (`listed`: directory -> names, as the stored manifest has them)."""
    pairs = (
        [p for p in recorded if isinstance(p, list) and len(p) == 2 and safe_observed(str(p[0]))]
        if isinstance(recorded, list)
        else []
    )
    names = {
        str(d): [str(n) for n in v]
        for d, v in (listed.items() if isinstance(listed, dict) else [])
        if isinstance(v, list)
    }
    now_names = {d: listing_at(d, snap) for d in names}
    return diff_observed(
        pairs, dict(identify([str(p[0]) for p in pairs], snap, cache)), names, now_names
    )


def entry_doc(
    name: str,
    m: Manifest,
    inputs: Mapping[str, str],
    *,
    rows: Any,
    content_hash: str,
    seconds: float,
    written_bytes: int,
    observed: Observed = (),
    listed: Mapping[str, list[str] | None] | None = None,
    form: str = "",
) -> dict[str, Any]:
    """The stored manifest of a stage's entry (`manifest.json`): what it was built from (the
    hashed manifest, input keys, dirty files, and what the build read at run time with the
    static fingerprint that records it) and what it holds (with its `form`, its consumers'
    keys take its content: inputid.py). Never hashed: times live here."""
    import time

    from hfbuild.core.version import __version__

    doc: dict[str, Any] = {
        "stage": name,
        "manifest": m.doc,
        "inputs": dict(inputs),
        "rows": rows,
        **split_order(rows),
        "content_hash": content_hash,
        **({"form": form} if form else {}),
        "dirty": [[f.path, f.status] for f in m.dirty],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "written_bytes": written_bytes,
        "hfbuild": __version__,
    }
    if observed:
        doc["static_fingerprint"] = m.static_fingerprint
        doc["observed"] = [list(p) for p in observed]
    if listed:  # what `explain` names when a listing changes
        doc["listings"] = {d: n for d, n in listed.items() if n is not None}
    return doc
