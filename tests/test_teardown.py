"""A one-shot hfbuild process skips the interpreter's final collection, and only at exit."""

from __future__ import annotations

import pathlib

from tests.helpers import run_python

PROGRAM = """
import gc, os, sys
from hfbuild.core import teardown


class Loud:
    def __init__(self, name):
        self.name = name
        self.me = self  # a cycle: only the collector frees it

    def __del__(self, write=os.write):
        write(2, f"{self.name} collected\\n".encode())


at_exit = Loud("at-exit")
if sys.argv[1] == "skip":
    teardown.skip_final_collection()
    teardown.skip_final_collection()
assert gc.get_freeze_count() == 0, "frozen before exit"
Loud("before-exit")
assert gc.collect() >= 1
"""


def test_final_collection_skipped_at_exit_only(tmp_path: pathlib.Path) -> None:
    """After `skip_final_collection`, cycles are still collected while the process runs, and
    those alive at exit are left to the system instead of being traversed."""
    plain = run_python(PROGRAM, tmp_path, args=["plain"])
    skipped = run_python(PROGRAM, tmp_path, args=["skip"])
    assert plain.stderr.splitlines() == ["before-exit collected", "at-exit collected"]
    assert skipped.stderr.splitlines() == ["before-exit collected"]


PAUSED = """
import gc, sys
from hfbuild.core import teardown

gc.collect()
with teardown.collection_paused():
    assert not gc.isenabled()
    before = gc.get_stats()[0]["collections"]
    kept = [[] for _ in range(100_000)]  # far over every threshold: a collector would run
    assert gc.get_stats()[0]["collections"] == before, "collected inside the block"
try:
    with teardown.collection_paused():
        raise KeyError("out of the block")
except KeyError:
    pass
print("enabled after", gc.isenabled(), file=sys.stderr)
gc.disable()
with teardown.collection_paused():
    pass
print("left disabled", not gc.isenabled(), file=sys.stderr)
"""


def test_the_collector_is_paused_for_the_block_only(tmp_path: pathlib.Path) -> None:
    """The cyclic collector does not run inside `collection_paused()` and runs again once the
    block ends, by an exception too; a collector the caller had paused stays paused."""
    out = run_python(PAUSED, tmp_path)
    assert out.stderr.splitlines()[-2:] == ["enabled after True", "left disabled True"]
