"""Files and directories of the project that a stage's arguments name by path.

A transform given `fn_kwargs={"tokenizer_path": "tok/tokenizer.json"}` reads that file, often
through compiled code no observation sees (Rust's `Tokenizer.from_file`, Arrow's C++). Its key
therefore holds the file's content from the first build on, before anything runs.

Owns: finding, among the strings of a manifest's encoded arguments (`fn_kwargs`, closure
cells, `functools.partial` arguments, defaults, a bound instance's attributes: whatever the
encoding holds) and of the module values its closure reads (`code.module_values`, and the
literal constants equal to their source that `liveness` reports), those naming an existing
file or directory of the project, and the manifest's `paths` part built from them:
`[where, repo-relative path, content]`, the content being a file's blob id, or for a
directory `{"dir": [[path below it, blob id], ...]}` over its files, recursively (without
`.git`, `__pycache__`, the store and environments kept in the project). A relative string is
taken relative to the project root (where doit runs a task and where `datasets` resolves a
relative name); an absolute one counts when it lies inside the root.

Cost: a string naming nothing costs a set lookup of its first component among the names in
the project root (listed once per manifest) before any stat is made.

Must never: put an absolute path in a manifest, key a path outside the project or the project
root itself, or stat a string whose first component the project root does not hold.
"""

from __future__ import annotations

import functools
import os
import posixpath
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from hfbuild.source.datafiles import StatCache, file_identities
from hfbuild.source.gitstate import Snapshot

# Tags of the canonical encoding (canonical.py) whose values hold no user string: a float's
# repr, bytes' hex, a type's or enum's qualified name, digests.
_OPAQUE = frozenset(
    {
        "float",
        "bytes",
        "bytearray",
        "complex",
        "ndarray",
        "numpy",
        "dtype",
        "enum",
        "type",
        "global",
        "tokenizer",
        "transformers-tokenizer",
        "Features",
        "recursive",
        "empty-cell",
    }
)
# Tags whose value is a list of [name, value] fields after a qualified name.
_FIELDS = frozenset({"dataclass", "namedtuple", "object"})
# Tags whose value is a list of [key, value] pairs.
_PAIRS = frozenset({"dict", "OrderedDict"})
# Tags wrapping other encoded values, with the positions that hold them.
_WRAPPERS = {
    "tuple": None,  # every member
    "set": None,
    "frozenset": None,
    "subclass": (1,),
    "registered": (1,),
    "custom": (1,),
    "defaultdict": (1,),
    "ndarray-object": (1,),
    "reduce": (2, 3, 4, 5),
}
_TAGS = _OPAQUE | _FIELDS | _PAIRS | _WRAPPERS.keys() | {"path", "callable", "str-in-root"}

MAX_LEN = 4096  # PATH_MAX: a longer string names no file
_SYSTEM = ("/dev/", "/proc/", "/sys/")  # not data: never said to be outside the project
ARGS = "argument "  # the prefix of a callable's `args` part in `paths_part`


def strings(
    tree: Any, prefix: str, keep: Callable[[str], bool] = lambda s: True, *, args: bool = False
) -> list[tuple[str, str]]:
    """(where, string) for each user string of an encoded tree that `keep` accepts, `where`
    naming it as `diff` names an argument (`fn_kwargs['tokenizer_path']`, `closure.path`)
    after `prefix` (`argument `). Where a string lies is spelled out only for those kept.
    `args`: the tree is a callable's `args` part (closure.py), whose plain dicts by name
    (`closure`, `globals`, `partial`) are not encoded values: a cell named `path` is not
    the tag `path`."""
    finder = _Finder(prefix, keep)
    if args:
        finder.args(tree)
    else:
        finder.walk(tree)
    return finder.out


# Parts of a callable's `args` (closure.py) that map names to encoded values.
_BY_NAME = frozenset({"closure", "globals", "partial", "defaults", "attrs"})


class _Finder:
    """One walk over an encoded tree: the strings `keep` accepts, with where they lie."""

    def __init__(self, prefix: str, keep: Callable[[str], bool]) -> None:
        self.prefix = prefix
        self.keep = keep
        self.parts: list[tuple[str, Any]] = []  # ("attr" | "key" | "index", name)
        self.out: list[tuple[str, str]] = []

    def where(self, last: tuple[str, Any] | None = None) -> str:
        from hfbuild.keys.diff import render

        text = self.prefix
        for kind, part in self.parts if last is None else [*self.parts, last]:
            if kind == "attr":
                text += part if not text or text[-1] == " " else f".{part}"
            elif kind == "key":
                text += f"[{render(part)}]"
            else:
                text += f"[{part}]"
        return text

    def string(self, s: str, last: tuple[str, Any] | None = None) -> None:
        if self.keep(s):
            self.out.append((self.where(last), s))

    def below(self, kind: str, name: Any, tree: Any, *, args: bool = False) -> None:
        """Walk `tree`, which lies at `name` (an attribute, key or index) of the current
        place; a string or a number without pushing a part."""
        if type(tree) is str:
            self.string(tree, (kind, name))
        elif type(tree) in (list, dict):
            self.parts.append((kind, name))
            self.args(tree) if args else self.walk(tree)
            self.parts.pop()

    def args(self, tree: Any) -> None:
        if type(tree) is not dict:
            self.walk(tree)
            return
        for k, v in tree.items():
            if k in _BY_NAME and type(v) is dict:
                self.parts.append(("attr", str(k)))
                for name, x in v.items():
                    self.below("attr", str(name), x)
                self.parts.pop()
            else:  # `func`: the arguments of the callable a partial wraps
                self.below("attr", str(k), v, args=k == "func")

    def walk(self, tree: Any) -> None:
        if type(tree) is str:
            self.string(tree)
        elif type(tree) is list:
            for i, v in enumerate(tree):
                self.below("index", i, v)
        elif type(tree) is dict:
            if len(tree) == 1:
                ((tag, v),) = tree.items()
                if tag in _TAGS:
                    self.tagged(tag, v)
                    return
            for k, v in tree.items():
                self.below("attr", str(k), v)

    def tagged(self, tag: str, v: Any) -> None:
        if tag in _OPAQUE:
            return
        if tag == "str-in-root":  # an absolute path inside the project, relative to it
            if type(v) is str:
                self.string(v)
        elif tag == "path":  # ["<root>", relative] or [class name, posix path]
            if type(v) is list and len(v) == 2 and type(v[1]) is str:
                self.string(v[1])
        elif tag == "callable":  # a callable's own arguments (its target names code files)
            if type(v) is dict:
                self.args(v.get("args"))
        elif tag in _PAIRS:
            keep = self.keep
            for pair in v if type(v) is list else ():
                if type(pair) is not list or len(pair) != 2:
                    continue
                key = pair[0]
                # Strings and numbers inline: a large dict costs a test per member.
                for x in pair:  # a key may name a file too
                    if type(x) is str:
                        if keep(x):
                            self.out.append((self.where(("key", key)), x))
                    elif type(x) is not int:
                        self.below("key", key, x)
        elif tag in _FIELDS:
            if type(v) is list and len(v) == 2 and type(v[1]) is list:
                for field in v[1]:
                    if type(field) is list and len(field) == 2:
                        self.below("attr", str(field[0]), field[1])
        elif type(v) is list:
            positions = _WRAPPERS.get(tag)
            if positions is None:
                self.walk(v)
            else:
                for i in positions:
                    if i < len(v):
                        self.walk(v[i])


class Names:
    """Which strings name a project file or directory: the cheap test first (the string's
    first component is a name in the project root, listed once per snapshot), then a stat."""

    def __init__(self, snap: Snapshot, exclude: Iterable[str] = ()) -> None:
        self.snap = snap
        self.root = snap.root
        self.exclude = tuple(exclude)
        self._prefix = self.root + os.sep
        try:
            top = set(os.listdir(self.root))
        except OSError:
            top = set()
        self._top = frozenset(top - {".git"})
        self._heads = self._top | {"."}  # "./tok/t.json"

    @functools.cached_property
    def _exclude(self) -> tuple[str, ...]:
        return tuple(os.path.join(os.path.realpath(e), "") for e in self.exclude if e)

    def candidate(self, s: str) -> bool:
        """Whether `s` could name a project path (`rel` says which), or a path outside the
        project (`outside`); no syscall."""
        if s[:1] == "/":
            return not s.startswith(self._prefix) or self.rel(s) is not None
        if s[:3] == "../":
            return True
        return s.partition("/")[0] in self._heads and self.rel(s) is not None

    def outside(self, s: str) -> bool:
        """Whether `s`, which `rel` refused, names an existing file or directory outside the
        project (absolute, or relative to the root through `..`): not keyed, said."""
        if s[:3] == "../":
            s = os.path.join(self.root, s)
        elif s[:1] != "/" or s.startswith(_SYSTEM) or len(s) > MAX_LEN or "\0" in s:
            return False
        real = os.path.realpath(s)
        return not (real + os.sep).startswith(self._prefix) and os.path.exists(real)

    def rel(self, s: str) -> str | None:
        """The repo-relative path `s` could name, or None; no syscall."""
        if not s or len(s) > MAX_LEN:
            return None
        if s[0] == "/":
            if not s.startswith(self._prefix):
                return None
            s = s[len(self._prefix) :]
        elif s[:2] == "./":
            s = s[2:]
        if s.partition("/")[0] not in self._top:
            return None
        rel = posixpath.normpath(s)
        if rel in (".", "..") or rel.startswith("../") or "\0" in rel:
            return None
        if ".git" in rel.split("/"):
            return None
        return rel

    def kind(self, rel: str) -> str | None:
        """ "file", "dir", or None (missing, or the store, or an environment)."""
        from hfbuild.source.importfind import in_environment

        full = self.snap.abspath(rel)
        real = os.path.realpath(full)
        if not real.startswith(self._prefix) or (real + os.sep).startswith(self._exclude):
            return None  # through a symlink out of the project, or the store
        if os.path.isfile(real):
            return None if in_environment(real, self.root) else "file"
        if os.path.isdir(real):
            if os.path.exists(os.path.join(real, "pyvenv.cfg")):
                return None
            return None if in_environment(os.path.join(real, "x"), self.root) else "dir"
        return None

    def files_below(self, rel: str) -> list[str]:
        """The files of a directory, recursively, as paths relative to it (sorted)."""
        top = self.snap.abspath(rel)
        out = []
        for d, dirs, files in os.walk(top):
            keep = []
            for name in dirs:
                full = os.path.join(d, name)
                if name in (".git", "__pycache__") or (full + os.sep).startswith(self._exclude):
                    continue
                if os.path.exists(os.path.join(full, "pyvenv.cfg")):
                    continue
                keep.append(name)
            dirs[:] = keep
            for name in files:
                full = os.path.join(d, name)
                if os.path.isfile(full):
                    out.append(os.path.relpath(full, top).replace(os.sep, "/"))
        return sorted(out)


# One listing of the root per snapshot (a pipeline's manifests share theirs).
_per_snapshot: weakref.WeakKeyDictionary[Snapshot, Names] = weakref.WeakKeyDictionary()


def paths_part(
    trees: Iterable[tuple[str, Any]],
    snap: Snapshot,
    cache: StatCache,
    exclude: Iterable[str] = (),
    outside: list[str] | None = None,
) -> list[list[Any]]:
    """The manifest's `paths` part for encoded trees given as (prefix, tree) (`ARGS` for a
    callable's `args` part): one `[where, path, content]` per string naming a project file
    or directory, sorted. Each string naming an existing path outside the project is added
    to `outside` as a sentence saying it is not keyed (never to the part)."""
    exclude = tuple(exclude)
    names = _per_snapshot.get(snap)
    if names is None or names.exclude != exclude:
        names = _per_snapshot[snap] = Names(snap, exclude)
    found: dict[tuple[str, str], str] = {}  # (where, rel) -> kind
    kinds: dict[str, str | None] = {}
    for prefix, tree in trees:
        for where, s in strings(tree, prefix, names.candidate, args=prefix == ARGS):
            rel = names.rel(s)
            if rel is None:
                if outside is not None and names.outside(s):
                    outside.append(
                        f"{where} names {s}, outside the project: its content is not in the "
                        f"key, so a change to it does not rebuild the stage; move it into the "
                        f"project to have it keyed"
                    )
                continue
            if rel not in kinds:
                kinds[rel] = names.kind(rel)
            kind = kinds[rel]
            if kind is not None:
                found[(where, rel)] = kind
    if not found:
        return []
    content: dict[str, Any] = {}
    for rel, kind in kinds.items():
        if kind == "file":
            content[rel] = file_identities([snap.abspath(rel)], snap, cache)[0][1]
        elif kind == "dir":
            below = names.files_below(rel)
            full = [snap.abspath(f"{rel}/{f}") for f in below]
            ids = [i for _, i in file_identities(full, snap, cache)]
            content[rel] = {"dir": [[f, i] for f, i in zip(below, ids, strict=True)]}
    return sorted([where, rel, content[rel]] for (where, rel) in found)


def named_files(doc: Any) -> list[tuple[str, str]]:
    """(repo-relative path, blob id) of every file a manifest's `paths` part keys: the files
    themselves and those of the directories."""
    out: list[tuple[str, str]] = []
    for entry in doc.get("paths") or [] if isinstance(doc, dict) else []:
        if not (isinstance(entry, list) and len(entry) == 3):
            continue
        _, rel, content = entry
        if isinstance(content, str):
            out.append((str(rel), content))
        elif isinstance(content, dict):
            out.extend((f"{rel}/{f}", str(i)) for f, i in content.get("dir") or [])
    return out
