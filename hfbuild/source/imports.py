"""The import graph of project code: what each Python file's imports reach.

Owns: the per-snapshot graph (`Graph`, kept in the snapshot's memo) of every file's resolved
edges, computed once per snapshot and shared by every stage of a pipeline, and each file's
closure (its project files, the packages and outside files it reaches, what could not be
resolved, the environment variables its files read by literal name); each file's resolved
edges kept in the code cache with the facts they rested on, re-checked before use. Scanning a
file is `importscan.py`'s; finding a module as Python would, `importfind.py`'s.

Must never: import a module to find it (that would run user code), follow files into
site-packages or a virtualenv, or use a stored resolution one of whose facts differs now.
"""

from __future__ import annotations

import os
import threading
from typing import Any, NamedTuple

from hfbuild.source.caches import CodeCache
from hfbuild.source.gitrepo import hash_bytes
from hfbuild.source.gitstate import Snapshot
from hfbuild.source.importfind import Facts, Resolver, digest, in_environment, outside_kind
from hfbuild.source.importscan import Scan, scan


class Edges(NamedTuple):
    """What one file's imports reach, resolved."""

    files: tuple[str, ...]  # project files (repo-relative)
    packages: tuple[str, ...]  # module names outside the project (installed, stdlib, missing)
    external: tuple[tuple[str, str], ...]  # (module, absolute path): files no distribution owns
    incomplete: tuple[str, ...]  # "path:line: why"
    env: tuple[str, ...] = ()  # environment variables the files read by literal name


# -- the graph of one snapshot ----------------------------------------------------------------


class Graph:
    """Every file's resolved imports within one snapshot, computed once and shared by all
    the closures walked in it."""

    def __init__(self, snap: Snapshot, cache: CodeCache | None) -> None:
        self.snap = snap
        self.cache = cache
        self.resolver = Resolver(snap)
        self._edges: dict[str, Edges] = {}
        self._external: dict[str, tuple[str, Edges]] = {}
        self._rel: dict[str, str | None] = {}
        self._kinds: dict[tuple[str, str], str] = {}
        self._statements: dict[tuple[int, str, tuple[str, ...], str], tuple[tuple[str, ...], Facts]]
        self._statements = {}
        self._closures: dict[str, Edges] = {}
        self._closure_sets: dict[str, _Sets] = {}  # every complete closure, as `_walk` merges them
        self._resolving = threading.Lock()
        self._facts: Facts = {}  # each fact's value now, computed once

    def project_rel(self, path: str) -> str | None:
        """`path` relative to the project root when it is project code: inside the root and
        not in an environment (a virtualenv) kept there; else None."""
        if path in self._rel:
            return self._rel[path]
        rel: str | None = None
        if not path.startswith("<module>"):
            rel = self.snap.rel(path)
            if rel is not None and in_environment(os.path.abspath(path), self.snap.root):
                rel = None
        self._rel[path] = rel
        return rel

    def edges(self, rel: str, blob: str) -> Edges:
        """The resolved imports of project file `rel` (whose blob id is `blob`)."""
        hit = self._edges.get(rel)
        if hit is None:
            here = os.path.dirname(self.snap.abspath(rel))
            key = self._resolution_key(rel, blob)
            hit = self._stored(key) if key is not None else None
            if hit is None:
                hit = self._resolve_file(rel, blob, here, key)
            self._edges[rel] = hit
        return hit

    def _resolution_key(self, rel: str, blob: str) -> str | None:
        """Where a file's resolution is kept in the code cache: its absolute path (so its
        directory and the project root) and blob id (None: not kept, in index mode)."""
        if self.cache is None or self.snap.mode != "worktree":
            return None
        return f"{self.snap.abspath(rel)}|{blob}"

    def _resolve_file(self, rel: str, blob: str, here: str, key: str | None) -> Edges:
        s = scan(blob, lambda: self.snap.read(rel), self.cache)
        incomplete = []
        if s.error:
            incomplete.append(f"{rel}: cannot be parsed ({s.error})")
        for line in s.dynamic:
            incomplete.append(
                f"{rel}:{line}: a dynamic import with a computed module name; edits to the "
                f"module it loads are not seen (import it statically, or list it in "
                f"file_deps)"
            )
        facts: Facts = {}
        targets = self._targets(s, here, facts)
        edges = self._classify(targets, tuple(incomplete), facts)._replace(env=s.env)
        if key is not None and self.cache is not None and None not in facts.values():
            self.cache.put_resolution(key, {"facts": facts, "edges": _encode_edges(edges)})
        return edges

    def _stored(self, key: str) -> Edges | None:
        """A file's resolved imports from the code cache, when every fact they rested on
        still holds (each fact is computed once per snapshot); None otherwise."""
        assert self.cache is not None
        stored = self.cache.resolution(key)
        try:
            facts = stored["facts"]
            edges = _decode_edges(stored["edges"])
        except (TypeError, KeyError):
            return None
        if edges is None or not isinstance(facts, dict):
            return None
        known = self._facts
        for k, v in facts.items():
            now = known.get(k, _UNSET)
            if now is _UNSET:
                now = self._now(k)
            if now is None or now != v:
                return None
        return edges

    def _now(self, key: str) -> Any:
        """A fact's value now (see `Facts`), computed once per snapshot."""
        now = self._facts.get(key, _UNSET)
        if now is _UNSET:
            now = self._facts[key] = self._fact(key)
        return now

    def _fact(self, key: str) -> Any:
        if not isinstance(key, str):
            return None
        kind, _, arg = key.partition(":")
        if kind == "p":
            return self._dir_class(arg)
        if kind == "k":
            module, _, path = arg.partition("|")
            return outside_kind(path, module)
        return self.resolver.fact(key)

    def _dir_class(self, directory: str) -> str:
        """What `project_rel` of a file in `directory` rests on: the project root, the
        directory's real path and whether it lies in an environment kept in the project."""
        real = os.path.realpath(directory)
        env = in_environment(os.path.join(directory, "x"), self.snap.root)
        return digest([self.snap.root, real, env])

    def closure(self, rel: str) -> Edges:
        """Project file `rel` and everything its imports reach through project files,
        transitively (files outside the project are left to the caller). Computed once per
        file per snapshot; a file on an import cycle is memoized only at the cycle's entry,
        where its closure is complete."""
        hit = self._closures.get(rel)
        if hit is None:
            files, packages, external, incomplete, env = self._walk(rel, {}, 0)[1]
            hit = Edges(
                tuple(files),
                tuple(packages),
                tuple(external),
                tuple(incomplete),
                tuple(sorted(env)),
            )
            self._closures[rel] = hit
        return hit

    def _walk(self, rel: str, stack: dict[str, int], depth: int) -> tuple[int, _Sets]:
        """(the lowest stack depth an import cycle from `rel` reached, its closure's parts as
        ordered dicts, which merge into a parent's without copying). Only the files asked for
        by `closure` become `Edges`: the modules between them (a chain of 20 in each of 20
        stages) are merged, never turned into tuples."""
        done = self._closure_sets.get(rel)
        if done is not None:
            return depth, done
        stack[rel] = depth
        files: dict[str, None] = {rel: None}
        packages: dict[str, None] = {}
        external: dict[tuple[str, str], None] = {}
        incomplete: dict[str, None] = {}
        env: set[str] = set()
        low = depth
        if rel.endswith(".py"):
            e = self.edges(rel, self.snap.file_id(rel).id)
            packages.update(dict.fromkeys(e.packages))
            external.update(dict.fromkeys(e.external))
            incomplete.update(dict.fromkeys(e.incomplete))
            env.update(e.env)
            for child in e.files:
                if child in stack:  # a cycle back to a file being walked
                    low = min(low, stack[child])
                    continue
                if child in files:
                    continue
                sub_low, (sub_files, sub_packages, sub_external, sub_incomplete, sub_env) = (
                    self._walk(child, stack, depth + 1)
                )
                low = min(low, sub_low)
                files.update(sub_files)
                if sub_packages:
                    packages.update(sub_packages)
                if sub_external:
                    external.update(sub_external)
                if sub_incomplete:
                    incomplete.update(sub_incomplete)
                env.update(sub_env)
        del stack[rel]
        sets = (files, packages, external, incomplete, env)
        if low >= depth:  # nothing reached a file above this one: complete
            self._closure_sets[rel] = sets
        return low, sets

    def external(self, module: str, path: str) -> tuple[str, Edges]:
        """(blob id, resolved imports) of a module file outside the project that no
        distribution owns (a sys.path hack): identified by name and content, never by path."""
        hit = self._external.get(path)
        if hit is None:
            with open(path, "rb") as f:
                data = f.read()
            blob = hash_bytes(data)
            s = scan(blob, lambda: data, self.cache)
            targets = self._targets(s, os.path.dirname(path), {})
            edges = self._classify(targets, (), {})._replace(env=s.env)
            hit = self._external[path] = (blob, edges)
        return hit

    def module(self, module: str, filename: str) -> Edges:
        """The edge to a module loaded from `filename` (a callable's defining module)."""
        return self._classify([(filename, module)], (), {})

    def _targets(self, s: Scan, here: str, facts: Facts) -> list[tuple[str, str]]:
        """(path, module) of every file the scanned imports load; what the resolution rested
        on is added to `facts`."""
        targets: list[tuple[str, str]] = []
        for ref in s.imports:
            # The same statement in the same directory resolves the same way (`import os`
            # in every file): resolved once per snapshot.
            key = (ref.level, ref.module, ref.names, here)
            hit = self._statements.get(key)
            if hit is None:
                # The resolver notes facts on itself: one statement at a time, so a thread's
                # facts never land in another's record.
                with self._resolving:
                    self.resolver.facts = {}
                    try:
                        paths = tuple(self.resolver.resolve(ref, here))
                        hit = self._statements[key] = (paths, self.resolver.facts)
                    finally:
                        self.resolver.facts = None
            facts.update(hit[1])
            targets.extend((p, ref.module) for p in hit[0])
        return targets

    def _classify(
        self, targets: list[tuple[str, str]], incomplete: tuple[str, ...], facts: Facts
    ) -> Edges:
        """Targets sorted into project files, packages and outside files; what that rested
        on is added to `facts` ("p:<dir>", "k:<module>|<path>")."""
        files: dict[str, None] = {}
        packages: dict[str, None] = {}
        external: dict[tuple[str, str], None] = {}
        for path, module in targets:
            if not path.startswith("<module>"):
                d = "p:" + os.path.dirname(os.path.abspath(path))
                facts[d] = self._now(d)
            rel = self.project_rel(path)
            if rel is not None:
                files[rel] = None
                continue
            kind = self._kinds.get((path, module))
            if kind is None:
                kind = self._kinds[(path, module)] = outside_kind(path, module)
            if not path.startswith("<module>"):
                facts[f"k:{module}|{path}"] = kind
            if path.startswith("<module>"):
                packages[path[len("<module>") :]] = None
            elif kind == "package":
                packages[module] = None
            elif kind == "file":
                external[(module, path)] = None
            # stdlib files: nothing to record
        return Edges(tuple(files), tuple(packages), tuple(external), incomplete)


_UNSET = object()
# A closure's files, packages, external files and incomplete lines as ordered dicts, and its
# environment variables.
_Sets = tuple[
    dict[str, None], dict[str, None], dict[tuple[str, str], None], dict[str, None], set[str]
]


def _encode_edges(e: Edges) -> list[Any]:
    external = [list(x) for x in e.external]
    return [list(e.files), list(e.packages), external, list(e.incomplete), list(e.env)]


def _decode_edges(v: Any) -> Edges | None:
    """Stored resolved imports, or None when the value is not exactly the shape
    `_encode_edges` writes."""
    try:
        files, packages, external, incomplete, env = v
        for x in (*files, *packages, *incomplete, *env):
            if type(x) is not str:
                return None
        pairs = []
        for module, path in external:
            if type(module) is not str or type(path) is not str:
                return None
            pairs.append((module, path))
        return Edges(tuple(files), tuple(packages), tuple(pairs), tuple(incomplete), tuple(env))
    except (TypeError, ValueError):
        return None


def graph(snap: Snapshot, cache: CodeCache | None = None) -> Graph:
    """The import graph of `snap`, created on first use and kept with the snapshot."""
    g = snap.memo.get("imports")
    if not isinstance(g, Graph):
        g = snap.memo["imports"] = Graph(snap, cache if cache is not None else snap.code_cache)
    return g
