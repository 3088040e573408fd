"""File modes of what hfbuild writes, and whether a store can be shared by a group.

Owns: the rule for every file and directory hfbuild creates (entries, build directories,
refs, manifests, lock files, the stat cache, roots.json, hfbuild.lock): its ordinary modes
(0666/0777 less the user's umask), and, inside a setgid directory, also group read and write
(directories also group search and setgid), as git's `core.sharedRepository=group` does. The
setgid bit makes the kernel give new files the directory's group, so a store made with
`chgrp team DIR && chmod 2775 DIR` stays usable by the whole team whatever each member's umask.
Also owns writing a file whole (`write_text_atomic`: a temporary file given those modes, then
one rename, so readers see the old file or the new one), `file_lock` (filelock with those
modes) and the diagnosis behind `hfbuild doctor`. Pure modules (datafiles' stat cache, the code
cache, the lock) write through here, never through the store.

Must never: widen a mode outside a setgid directory, change a file's group (the kernel does
that), fail a write because a mode could not be changed (a file someone else owns is left as
it is, and doctor reports it), or print.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
_GROUP_FILE = stat.S_IRGRP | stat.S_IWGRP
_GROUP_DIR = stat.S_IRWXG | stat.S_ISGID


def shared(directory: str) -> bool:
    """Whether files created in `directory` are shared with its group (it is setgid)."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_ISGID)
    except OSError:
        return False


def file_mode(directory: str) -> int:
    """The mode for a new file in `directory`."""
    mode = 0o666 & ~_UMASK
    return mode | _GROUP_FILE if shared(directory) else mode


def dir_mode(parent: str) -> int:
    """The mode for a new directory in `parent`."""
    mode = 0o777 & ~_UMASK
    return mode | _GROUP_DIR if shared(parent) else mode


def _chmod(path: str, mode: int) -> None:
    with contextlib.suppress(PermissionError):  # not ours: doctor reports it
        os.chmod(path, mode)


def makedirs(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`, each directory it creates given `dir_mode`."""
    missing: list[str] = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not missing:  # already there: os.makedirs would only fail a mkdir (EEXIST)
        return
    os.makedirs(path, exist_ok=True)
    for d in reversed(missing):
        _chmod(d, dir_mode(os.path.dirname(d)))


def share_tree(path: str) -> None:
    """Give everything under `path` (written by other code, e.g. datasets into a build
    directory) the group bits its place asks for; nothing changes outside a setgid directory."""
    if not shared(os.path.dirname(os.path.abspath(path))):
        return
    for dirpath, _, names in os.walk(path):
        _chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) | _GROUP_DIR)
        for n in names:
            full = os.path.join(dirpath, n)
            _chmod(full, stat.S_IMODE(os.lstat(full).st_mode) | _GROUP_FILE)


def file_lock(path: str, timeout: float = -1) -> Any:
    """A `filelock.FileLock` whose lock file gets `file_mode`: in a shared store, another
    member of the group can open (and so take) a lock file someone else created."""
    from filelock import FileLock  # 50 ms to import: only writers pay it

    return FileLock(path, timeout=timeout, mode=file_mode(os.path.dirname(path)))


# -- hfbuild doctor --------------------------------------------------------------------------


class Finding(NamedTuple):
    """One reason others cannot use the store."""

    path: str
    problem: str


class Diagnosis(NamedTuple):
    root: str
    group: str  # the store directory's group
    shared: bool  # whether the store is meant to be shared (or checked as if it were)
    findings: list[Finding]
    flock: str | None  # why flock does not work on the store's disk (None: it works)

    def fix(self) -> list[str]:
        """Shell commands that make the store usable by its group (run by the files' owners,
        or root)."""
        q = _quote(self.root)
        return [
            f"chgrp -R {self.group} {q}",
            f"chmod -R g+rwX {q}",
            f"find {q} -type d -exec chmod g+s {{}} +",
        ]


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _in_group(gid: int) -> bool:
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def diagnose(root: str, *, want_shared: bool = False) -> Diagnosis:
    """Whether the store at `root` can be used by other members of its group. A store is
    checked as shared when its directory is setgid or group-writable, when its files belong
    to several users, or when `want_shared`; a private store is only checked for flock."""
    st = os.stat(root)
    gid = st.st_gid
    group = _group_name(gid)
    findings: list[Finding] = []
    owners: set[int] = set()
    walked: list[tuple[str, os.stat_result, bool]] = []
    for dirpath, _, names in os.walk(root):
        walked.append((dirpath, os.lstat(dirpath), True))
        for n in names:
            full = os.path.join(dirpath, n)
            with contextlib.suppress(OSError):
                walked.append((full, os.lstat(full), False))
    for _, s, _ in walked:
        owners.add(s.st_uid)
    meant = want_shared or bool(st.st_mode & (stat.S_ISGID | stat.S_IWGRP)) or len(owners) > 1
    if meant:
        if not _in_group(gid):
            user = pwd.getpwuid(os.geteuid()).pw_name
            findings.append(Finding(root, f"you ({user}) are not a member of its group {group}"))
        locks = os.path.join(root, "locks")
        for path, s, is_dir in walked:
            if stat.S_ISLNK(s.st_mode):
                continue
            mode = s.st_mode
            why = []
            if s.st_gid != gid:
                why.append(f"group {_group_name(s.st_gid)}, not {group}")
            if is_dir:
                if mode & stat.S_IRWXG != stat.S_IRWXG:
                    why.append("not group-writable")
                if not mode & stat.S_ISGID:
                    why.append("not setgid (new files would not get the group)")
            else:
                if not mode & stat.S_IRGRP:
                    why.append("not group-readable")
                if path.startswith(locks + os.sep) and not mode & stat.S_IWGRP:
                    why.append("a lock file others cannot open for writing")
            if why:
                findings.append(Finding(path, ", ".join(why)))
    return Diagnosis(root, group, meant, findings, flock_problem(root))


_PROBE = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(0)
sys.exit(1)
"""


def mount_of(directory: str, table: str = "/proc/mounts") -> tuple[str, str, set[str]] | None:
    """(mount point, file system type, options) of the mount holding `directory`, read from
    the kernel's mount table; None where there is none (not Linux)."""
    try:
        with open(table, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(directory)
    best: tuple[str, str, set[str]] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        # Spaces, tabs and backslashes in mount points are octal escapes in the table.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, parts[2], set(parts[3].split(",")))
    return best


def local_only_flock(directory: str, table: str = "/proc/mounts") -> str | None:
    """Why flock in `directory` locks only this machine's processes, when its mount says so:
    an NFS mount with `local_lock=flock` or `local_lock=all`, a Lustre mount with
    `localflock`. The probe between two processes of this machine passes there, yet builds
    on two machines would not exclude each other."""
    found = mount_of(directory, table)
    if found is None:
        return None
    point, fstype, options = found
    local = None
    if fstype.startswith("nfs") and options & {"local_lock=flock", "local_lock=all"}:
        local = next(o for o in sorted(options) if o.startswith("local_lock="))
    elif fstype == "lustre" and "localflock" in options:
        local = "localflock"
    if local is None:
        return None
    return (
        f"it is on {fstype} mounted at {point} with {local}: flock there locks only this "
        f"machine's processes, so builds on two machines would not exclude each other"
    )


def flock_problem(directory: str) -> str | None:
    """Why flock (what filelock uses) does not lock files in `directory` between processes,
    or None when it does: the mount's options (`local_only_flock`), then lock a file here and
    check another process is refused it."""
    import fcntl

    local = local_only_flock(directory)
    if local is not None:
        return local

    try:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".hfbuild-flock-probe-")
    except OSError as e:
        return f"cannot create a file in {directory} ({e.strerror})"
    try:
        with os.fdopen(fd, "r+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                return f"flock fails on this filesystem ({e.strerror})"
            other = subprocess.run(
                [sys.executable, "-c", _PROBE, path], capture_output=True, check=False
            )
            if other.returncode != 0:
                return "flock does not exclude another process on this filesystem"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def write_text_atomic(path: str, text: str, *, durable: bool = True) -> None:
    """Write a file so readers see the old one or the new one, never half of either;
    `durable` also flushes it to the disk before the rename."""
    d = os.path.dirname(path) or os.curdir
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".hfbuild")
    try:
        # mkstemp makes owner-only files: give it the modes an ordinary file gets here.
        os.fchmod(fd, file_mode(d))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, doc: Any, *, durable: bool = True, indent: int | None = 1) -> None:
    """`doc` as sorted JSON, indented for people unless `indent=None` (one line: json's C
    encoder, several times faster than its indenting one, which is pure Python). `doc` is a
    tree of plain values: no cycle check (an id() per list and dict, each an audit event)."""
    text = json.dumps(doc, sort_keys=True, indent=indent, ensure_ascii=False, check_circular=False)
    text += "\n"
    write_text_atomic(path, text, durable=durable)
