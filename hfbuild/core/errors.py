"""Every error and warning hfbuild gives a user.

Owns: the `HfbuildError` family and hfbuild's warning categories. Each error's `str()` is a
finished message for a person: what happened and what to do. An error made while doit imports
a dodo file is also doit's `InvalidDodoFile`, the user error doit prints as one line (`ERROR:
<message>`, exit 3) instead of a traceback. Must never: import anything heavy (doit's
exceptions module only when doit is already loading a dodo file), or hold behaviour beyond
formatting a message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from types import FrameType
from typing import Any


class HfbuildError(Exception):
    """Base of every error a user can cause; the CLI turns it into exit code 1."""

    def __new__(cls, *args: Any, **kwargs: Any) -> HfbuildError:
        # doit prints a traceback for any exception raised while it imports dodo.py, except
        # its own user errors: a mistake in a pipeline's definition (an input naming no
        # stage) is then one line under `doit run`, as it is under `hfbuild status`.
        if doit_loading(sys._getframe(1)):
            cls = _as_doit_error(cls)
        return super().__new__(cls, *args, **kwargs)


_LOADER = os.path.join("doit", "loader.py")
_doit_classes: dict[type[HfbuildError], type[HfbuildError]] = {}


def doit_loading(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside doit importing a dodo file (doit's `loader.get_module`
    is on its stack)."""
    if "doit.loader" not in sys.modules:
        return False
    while frame is not None:
        code = frame.f_code
        if code.co_name == "get_module" and code.co_filename.endswith(_LOADER):
            return True
        frame = frame.f_back
    return False


def _as_doit_error(cls: type[HfbuildError]) -> type[HfbuildError]:
    """`cls`, also a subclass of doit's `InvalidDodoFile` (same name, module and message)."""
    known = _doit_classes.get(cls)
    if known is None:
        from doit.exceptions import InvalidDodoFile

        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        known = _doit_classes[cls] = type(cls.__name__, (cls, InvalidDodoFile), names)
    return known


class NotARepositoryError(HfbuildError):
    """A path that must be inside a git work tree is not."""


class GitStateError(HfbuildError):
    """git data could not be read (a corrupt index, an unreadable file)."""


class UnmergedError(GitStateError):
    """A file needed from the git index is unmerged: a merge conflict is in progress."""


class UnhashableArgumentError(HfbuildError, TypeError):
    """An argument has no canonical encoding; the message names its path and both fixes."""

    def __init__(self, path: str, obj: object, why: str = "") -> None:
        self.path = path
        tp = type(obj)
        name = f"{tp.__module__}.{tp.__qualname__}"
        detail = f" ({why})" if why else ""
        super().__init__(
            f"{path}: cannot fingerprint an object of type {name}{detail}. "
            f"Give the class a __hfbuild_fingerprint__() method that returns a value describing "
            f"its state (str, int, dict, ...), or register an encoder with "
            f"hfbuild.register_canonical({tp.__qualname__}, fn)."
        )


class ClosureError(HfbuildError):
    """The code of a callable cannot be identified."""


class StaleModuleError(HfbuildError):
    """This process runs a module's code from before its file was edited (a notebook kernel)."""

    def __init__(
        self,
        rel: str,
        module: str,
        function: str | None = None,
        *,
        after_fingerprint: bool = False,
        stale_pyc: bool = False,
    ) -> None:
        self.path = rel
        self.module = module
        if after_fingerprint:
            what = (
                f"module {module} ran code loaded after the stage's fingerprint was taken, and "
                f"{rel} no longer holds the code that fingerprint hashed; nothing was stored"
            )
        elif function is None:
            what = f"module {module} was loaded before {rel} was changed on disk"
        else:
            what = (
                f"{module}.{function} is a function from before {module} was reloaded, and "
                f"{rel} has changed since it was defined"
            )
        super().__init__(
            f"{what}: the code this process would run is not the code the fingerprint hashes, "
            f"and its result would be stored under the wrong key. Restart the kernel (or the "
            f"process), or run `importlib.reload({module})` and take the transform from the "
            f"reloaded module again"
            + (" (and define the Pipeline again)." if after_fingerprint else ".")
            + (
                f" Its bytecode cache (__pycache__) was written within the second {rel} was "
                f"last changed and may hold the older code, which Python would load again: "
                f"delete that __pycache__ first."
                if stale_pyc
                else ""
            )
        )


class DirtyTreeError(HfbuildError):
    """Strict mode (HFBUILD_STRICT=1 or --strict) and a stage's code has uncommitted changes."""


class StageError(HfbuildError):
    """A pipeline is defined wrongly: a bad stage name, a duplicate, an unknown input."""


class MissingDataError(StageError):
    """A data-file pattern (a load stage's data_files, or file_deps) matches no file."""


class NotBuiltError(HfbuildError):
    """A result was asked for that the store does not hold."""


class DamagedEntryError(NotBuiltError):
    """A result was asked for whose store entry is damaged (its files were changed after it
    was stored): it is not served; a build sets it aside and builds it again."""


class BuildError(HfbuildError):
    """A stage's transform raised; the store is unchanged."""


class UnshippedListingError(BuildError):
    """A build on a Ray worker listed project folders (`paths`: `dir/.`, `.` for the root)
    that its shipped tree does not hold with their names: what it listed there is not what
    the project holds. The worker returns the paths; the driver ships those folders and sends
    the unit again (`ray_executor`), so a user meets this only as the driver's error."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = sorted(set(paths))
        super().__init__(
            f"the build listed {', '.join(self.paths)} at run time, which the Ray worker's "
            f"tree does not hold with their names; nothing was published."
        )


class StoreError(HfbuildError):
    """The store cannot be used: not writable, full, or an entry is corrupt."""


class ConfigError(HfbuildError):
    """The project's `[tool.hfbuild]` settings in pyproject.toml cannot be read or are wrong."""


class DirtyTreeWarning(UserWarning):
    """A stage's fingerprint includes uncommitted or untracked files (named in the message)."""


class IncompleteClosureWarning(UserWarning):
    """A dynamic import could not be resolved statically; edits to its target are not seen."""


class RemoteWarning(UserWarning):
    """The remote cache could not be used for a stage; it was built locally instead."""


class CorruptEntryWarning(UserWarning):
    """A store entry failed its checks (it is damaged); it was moved aside and is rebuilt."""


class LockRewrittenWarning(UserWarning):
    """A build found hfbuild.lock with merge conflict markers and rewrote it (says how)."""


class ObservationWarning(UserWarning):
    """Something a stage may have read at run time could not be observed."""
