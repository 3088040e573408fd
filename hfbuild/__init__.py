"""hfbuild: correct caching for Hugging Face `datasets` transforms, run as doit tasks.

The public API, and nothing else. Importing hfbuild does not import `datasets`.
"""

from __future__ import annotations

from hfbuild.core.canonical import register_canonical
from hfbuild.core.errors import (
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
from hfbuild.core.version import __version__
from hfbuild.frontends.dataset_ops import filter, map
from hfbuild.frontends.tasks import Pipeline
from hfbuild.keys.fingerprint import fingerprint
from hfbuild.keys.manifest import Manifest
from hfbuild.pipeline.stages import Stage
from hfbuild.source import observe as _observe

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
