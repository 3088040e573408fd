"""hfbuild: correct caching for Hugging Face `datasets` transforms, run as doit tasks.

The public API, and nothing else. Importing hfbuild does not import `datasets`.
"""

from __future__ import annotations

from hfbuild import observe as _observe
from hfbuild.canonical import register_canonical
from hfbuild.dataset_ops import filter, map
from hfbuild.errors import (
    BuildError,
    ClosureError,
    DamagedEntryError,
    DirtyTreeError,
    DirtyTreeWarning,
    GitStateError,
    HfbuildError,
    IncompleteClosureWarning,
    NotARepositoryError,
    NotBuiltError,
    ObservationWarning,
    StageError,
    StaleModuleError,
    StoreError,
    UnhashableArgumentError,
)
from hfbuild.fingerprint import fingerprint
from hfbuild.manifest import Manifest
from hfbuild.stages import Stage
from hfbuild.tasks import Pipeline
from hfbuild.version import __version__

# Before the project's modules are imported (dodo.py imports hfbuild first), so that the files
# they read while they are imported are observed.
_observe.install()

__all__ = [
    "BuildError",
    "ClosureError",
    "DamagedEntryError",
    "DirtyTreeError",
    "DirtyTreeWarning",
    "GitStateError",
    "HfbuildError",
    "IncompleteClosureWarning",
    "Manifest",
    "NotARepositoryError",
    "NotBuiltError",
    "ObservationWarning",
    "Pipeline",
    "Stage",
    "StageError",
    "StaleModuleError",
    "StoreError",
    "UnhashableArgumentError",
    "__version__",
    "filter",
    "fingerprint",
    "map",
    "register_canonical",
]
