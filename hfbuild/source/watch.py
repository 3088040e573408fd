"""Files opened in the project by any process, whatever code opens them (Linux's inotify).

The audit hook (`observe.py`) sees what Python opens; a Rust tokenizer's `from_file`, Arrow's
C++ `read_table` or a C extension opens files unseen. inotify reports every open of a file in
a watched directory, by any process of the machine: the build process, its `num_proc`
workers however started, and any other process (whose reads only add to a key: at worst a
rebuild, never a wrong result).

Owns: one inotify instance per project root and process (made at the first build, kept for the
process's life), a watch on every directory under the root except `.git`, `__pycache__` and
those the caller skips (the store, installed environments), each watched before it is looked at
and listed only when its link count says it can hold a directory, added for directories that
appear later as they appear; a reader thread that drains the kernel's queue as events arrive
(so a long build does not overflow it); and `Window`, what was read between a build's start and
its end, and how often each watched directory was opened (to be listed, mostly: by any code,
compiled code included). inotify's open event does not say whether a file was opened to read or
to write, so a file counts as read when it was closed after a read-only open, read (`read(2)`)
before anything wrote it, or is still open at the end; a file created, moved in, or closed
after a write-open before anything read it, is output, not input. An overflowed queue, a
watched directory moved, or a watch that cannot be added to a directory that was there before
makes the window's reads unknown (`Window.unknown`): the caller must not trust them. Where
inotify is unavailable (not Linux) there is no window; where the watch limit
(`/proc/sys/fs/inotify/max_user_watches`) or the instance limit is reached, a one-time
`ObservationWarning` says so and there is no window either: the audit hook alone observes.

Must never: raise out of the reader thread, be used by a forked child (the thread does not
exist there and its lock may be held), follow a symbolic link to watch outside the root, or
count a `.py`/`.pyc` file (module code: the audit hook's `exec` event names what runs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable

from hfbuild.core.errors import ObservationWarning

# Linux's inotify bits (<sys/inotify.h>).
IN_ACCESS = 0x1
IN_CLOSE_WRITE = 0x8
IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

_EVENTS = (
    IN_ACCESS | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_OPEN | IN_MOVED_TO | IN_CREATE | IN_MOVE_SELF
)
# Only directories, never through a symbolic link, no events for unlinked children.
_MASK = _EVENTS | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
_GATHER = 0.005  # seconds the reader thread waits after the queue becomes readable
_READ_SIZE = 1 << 16  # bytes per read(2) of the queue (an event is 16 bytes and its name)
_NEVER = frozenset({".git", "__pycache__", "site-packages", "dist-packages"})
_ENVIRONMENT_MARKS = frozenset({"pyvenv.cfg", "conda-meta"})
_CODE = (".py", ".pyc", ".pyo")

# A path's state within a window: the first event that decides it wins.
_OPENED, _READ, _WRITTEN = 1, 2, 3

OVERFLOW = "the kernel's inotify queue overflowed"
MOVED = "a watched directory was moved"
UNWATCHED = "a directory could not be watched"


class Window:
    """What was opened for reading under the root between `Watcher.window()` and `close()`.
    `unknown` says why its reads cannot be trusted (None: they can)."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher
        self._state: dict[str, int] = {}
        self._dir_opens: dict[str, int] = {}  # directory -> times any process opened it
        self.unknown: str | None = None

    def _event(self, path: str, mask: int) -> None:
        state = self._state.get(path)
        if state is not None and state != _OPENED:
            return
        if mask & (IN_CLOSE_NOWRITE | IN_ACCESS):
            self._state[path] = _READ
        elif mask & (IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO):
            self._state[path] = _WRITTEN
        elif mask & IN_OPEN:
            self._state[path] = _OPENED

    def reads(self, written: Iterable[str] = ()) -> set[str]:
        """Absolute paths read so far (every event up to now counted). A file still open
        counts as read unless `written` (what the caller knows was opened to write) has it."""
        self._watcher.drain()
        with self._watcher.lock:
            items = list(self._state.items())
        out = {p for p, s in items if s == _READ}
        late = {p for p, s in items if s == _OPENED}
        return out | (late - set(written))

    def directories_opened(self) -> dict[str, int]:
        """How many times each watched directory (absolute) was opened so far, by any
        process: to list it (`opendir`, whatever code calls it), or to use it as an `openat`
        base (every event up to now counted)."""
        self._watcher.drain()
        with self._watcher.lock:
            return dict(self._dir_opens)

    def close(self) -> None:
        self._watcher.drain()
        with self._watcher.lock:
            self._watcher.windows.remove(self)


class Watcher:
    """The inotify instance of one root in this process, and its reader thread."""

    def __init__(self, root: str, skip: Callable[[str], bool]) -> None:
        from inotify_simple import INotify, parse_events

        self._parse = parse_events
        self.root = root
        self._skip = skip
        self.lock = threading.Lock()
        self.windows: list[Window] = []
        self._dirs: dict[int, str] = {}  # watch descriptor -> absolute directory
        self._pid = os.getpid()
        self._ino = INotify(nonblocking=True)
        try:
            self._watch_initial(root)
        except BaseException:
            self._ino.close()
            raise
        self._thread = threading.Thread(target=self._run, name="hfbuild-inotify", daemon=True)
        self._thread.start()

    @property
    def directories(self) -> int:
        return len(self._dirs)

    def usable(self) -> bool:
        return os.getpid() == self._pid

    def window(self) -> Window:
        self.drain()  # events from before the build are not its reads
        w = Window(self)
        with self.lock:
            self.windows.append(w)
        return w

    # -- watching ---------------------------------------------------------------------------

    def _watch_initial(self, root: str) -> None:
        """Watch every directory of the project: each is watched before it is looked at, so
        a directory created in it afterwards is reported (`_handle` watches it), then listed
        only when it can hold a directory: where the file system counts a directory's
        subdirectories in its link count (`_leaf_counts`), a link count of 2 says it holds
        none, and most of a big tree (its leaves) is watched without being listed (a listing
        costs a scan of its names, and makes three events on it and three on its parent)."""
        ino = self._ino
        dev = os.lstat(root).st_dev
        leaf_counts = _leaf_counts(root)
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                wd = ino.add_watch(d, _MASK)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise
                continue  # gone meanwhile, or not ours to read
            self._dirs[wd] = d
            try:
                st = os.lstat(d)
                if leaf_counts and st.st_nlink == 2 and st.st_dev == dev:
                    continue  # no subdirectory (one made from now on is reported)
                below = self._subdirectories(d)
            except OSError:
                continue
            if below is None:  # an environment: not the project's files
                self._dirs.pop(wd, None)
                with contextlib.suppress(OSError):
                    ino.rm_watch(wd)
                continue
            stack.extend(p for p in below if not self._skip(p))

    def _subdirectories(self, d: str) -> list[str] | None:
        """The directories in `d` worth watching; None when `d` is an environment (it holds
        `pyvenv.cfg` or `conda-meta`, as `importfind.in_environment` tells one)."""
        below: list[str] = []
        with os.scandir(d) as it:
            for entry in it:
                name = entry.name
                if name in _ENVIRONMENT_MARKS:
                    return None
                if name not in _NEVER and entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
        return below

    def _watch_tree(self, top: str, *, initial: bool = False) -> None:
        """Watch `top` and every directory below it (a directory that appears meanwhile is
        watched by its creation event): each is watched before it is listed, so none
        created in between is missed. Files found in a directory that appeared later are
        output of the windows open now, as a file created or moved in is. An environment
        (a directory holding `pyvenv.cfg` or `conda-meta`, or named site-packages) is left,
        as `importfind.in_environment` leaves it, by its listing's names: no stat per
        directory. With `initial`, the watch limit raises `OSError`."""
        stack = [top]
        ino = self._ino
        while stack:
            d = stack.pop()
            try:
                wd = ino.add_watch(d, _MASK)
            except OSError as e:
                if initial and e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise
                if initial or e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    # Present and unwatchable (the limit, a permission): what is opened
                    # there is not seen. (Gone, or not a directory: nothing to see there.)
                    for w in self.windows:
                        w.unknown = w.unknown or UNWATCHED
                continue
            self._dirs[wd] = d
            below: list[str] = []
            environment = False
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        name = entry.name
                        if name in _ENVIRONMENT_MARKS:
                            environment = True
                            break
                        if name not in _NEVER and entry.is_dir(follow_symlinks=False):
                            below.append(entry.path)
                        elif not initial:
                            # In a directory that appeared during a window: created or
                            # moved in since it began, maybe before this watch could see it.
                            for w in self.windows:
                                w._state[entry.path] = _WRITTEN
            except OSError:
                continue
            if environment:  # not the project's files
                self._dirs.pop(wd, None)
                with contextlib.suppress(OSError):
                    ino.rm_watch(wd)
                continue
            stack.extend(p for p in below if not self._skip(p))

    # -- reading events ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._ino.fileno(), select.POLLIN)
        while True:
            try:
                poller.poll()
                # Let a burst of events gather (and the kernel merge repeats: a file read
                # in many read(2) calls) before waking up for them: a few ms of a queue of
                # 16,384 events by default.
                time.sleep(_GATHER)
                self.drain()
            except Exception:  # the instance was closed, or a bug: stop reading, loudly
                with self.lock:
                    for w in self.windows:
                        w.unknown = w.unknown or OVERFLOW
                return

    def drain(self) -> None:
        """Handle every event queued up to now: read until the (non-blocking) descriptor
        has nothing more, one `read(2)` when nothing is queued."""
        fd = self._ino.fileno()
        parse = self._parse
        with self.lock:
            while True:
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    return
                if not data:
                    return
                self._handle(parse(data))

    def _handle(self, events: Iterable[tuple[int, int, int, str]]) -> None:
        windows = self.windows
        for wd, mask, _cookie, name in events:
            if mask & IN_Q_OVERFLOW:
                for w in windows:
                    w.unknown = w.unknown or OVERFLOW
                continue
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            d = self._dirs.get(wd)
            if d is None:
                continue
            if mask & IN_MOVE_SELF:
                # Paths below it are now named by where it was: what is read there is lost.
                for w in windows:
                    w.unknown = w.unknown or MOVED
                continue
            if not name:  # the directory itself
                if mask & IN_OPEN:  # opened: to be listed, mostly
                    for w in windows:
                        w._dir_opens[d] = w._dir_opens.get(d, 0) + 1
                continue
            path = d + "/" + name
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO) and name not in _NEVER and not self._skip(path):
                    self._watch_tree(path)
                continue
            if not windows or name.endswith(_CODE):
                continue
            for w in windows:
                w._event(path, mask)


# File systems whose directories' link count is 2 + their subdirectories (as mountinfo names
# them). Btrfs and merged overlayfs directories report 1, others may report anything: every
# directory there is listed.
_LEAF_COUNTING = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})


def _leaf_counts(root: str) -> bool:
    """Whether the file system `root` is on counts subdirectories in a directory's link
    count (its type from /proc/self/mountinfo: the mount point that is the longest prefix of
    `root`). A directory on another device below `root` is listed whatever its count."""
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        prefix = point.rstrip("/") + "/"
        if (root + "/").startswith(prefix) and len(point) >= len(best):
            best, kind = point, right.split(" ", 1)[0]
    return kind in _LEAF_COUNTING


_watchers: dict[str, Watcher | None] = {}  # root -> its watcher (None: cannot watch)
_warned = False
_make_lock = threading.Lock()


def window(root: str, skip: Callable[[str], bool]) -> Window | None:
    """A window over `root`'s files, or None where inotify cannot watch it (not Linux, the
    watch or instance limit reached: then the audit hook alone observes; warned once)."""
    if not sys.platform.startswith("linux"):
        return None
    with _make_lock:
        if root in _watchers:
            w = _watchers[root]
        else:
            w = _watchers[root] = _make(root, skip)
    if w is None or not w.usable():
        return None
    return w.window()


def _make(root: str, skip: Callable[[str], bool]) -> Watcher | None:
    global _warned
    try:
        return Watcher(root, skip)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENOMEM):
            raise
        if not _warned:
            _warned = True
            which = "max_user_watches" if e.errno == errno.ENOSPC else "max_user_instances"
            warnings.warn(
                f"inotify cannot watch the project's directories ({e.strerror}: the limit "
                f"/proc/sys/fs/inotify/{which}): files opened by compiled code (a Rust "
                f"tokenizer, pyarrow) are not observed in this process, only what Python "
                f"opens. Raise the limit (sysctl fs.inotify.{which}=...), or declare such "
                f"files in file_deps.",
                ObservationWarning,
                stacklevel=5,
            )
        return None
