"""Build leftovers go to a trash directory in the store's tmp/ and are removed when the
process exits (or when many are waiting), not while the build creates files."""

from __future__ import annotations

import json
import os
import pathlib

from tests.helpers import run_python

DEFER = """
import json, os, sys
from hfbuild.store import trash
tmp = sys.argv[1]
for i in range(int(sys.argv[2])):
    d = os.path.join(tmp, f"left-{i}")
    os.makedirs(os.path.join(d, "sub"))
    open(os.path.join(d, "sub", "f"), "w").write("x")
    trash.defer(d, tmp)
print(json.dumps(sorted(os.listdir(tmp))))
"""


def test_leftovers_wait_in_the_trash_until_the_process_exits(tmp_path: pathlib.Path) -> None:
    """Deferred leftovers leave their place at once, wait in one trash directory while the
    process runs, and are gone when it has exited."""
    out = run_python(DEFER, tmp_path, args=[str(tmp_path), "3"])
    during = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(during) == 1 and during[0].startswith("trash.")
    assert list(tmp_path.iterdir()) == []


def test_a_long_lived_process_empties_its_trash_every_limit_leftovers(
    tmp_path: pathlib.Path,
) -> None:
    """A process that keeps building (a notebook) does not pile leftovers up: every
    `LIMIT` deferred leftovers the trash is emptied."""
    code = (
        "from hfbuild.store import trash; trash.LIMIT = 4\n"
        + DEFER
        + (
            "print(len(os.listdir(os.path.join(tmp, os.listdir(tmp)[0]))) "
            "if os.listdir(tmp) else 0)\n"
        )
    )
    out = run_python(code, tmp_path, args=[str(tmp_path), "6"])
    assert out.stdout.strip().splitlines()[-1] == "2"  # 4 removed at the 4th; 2 waiting


def test_a_leftover_is_removed_at_once_when_the_trash_is_gone(tmp_path: pathlib.Path) -> None:
    """When the trash directory was removed under the process (a concurrent `hfbuild gc`),
    the next leftover goes to a new one, and it too is gone at exit."""
    late = (
        "import shutil\n"
        "shutil.rmtree(os.path.join(tmp, os.listdir(tmp)[0]))\n"
        "d = os.path.join(tmp, 'late'); os.makedirs(d); trash.defer(d, tmp)\n"
    )
    code = DEFER.replace("print(json", late + "print(json")
    assert code != DEFER
    out = run_python(code, tmp_path, args=[str(tmp_path), "2"])
    during = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(during) == 1 and during[0].startswith("trash.")
    assert list(tmp_path.iterdir()) == []


def test_the_trash_is_emptied_once_it_holds_limit_bytes(tmp_path: pathlib.Path) -> None:
    """A build whose leftovers are large (files datasets extracted) does not keep them to
    the end: once `LIMIT_BYTES` wait in the trash it is emptied."""
    code = """
    import json, os, sys
    from hfbuild.store import trash
    from hfbuild.store.store import Store
    trash.LIMIT_BYTES = 10
    store = Store(sys.argv[1])
    tmp = os.path.join(sys.argv[1], "tmp")
    seen = []
    for i in range(3):
        d = store.new_build_dir(f"{i:032x}")
        open(os.path.join(d, "big"), "w").write("123456")
        store.discard(d)
        bins = [n for n in os.listdir(tmp) if n.startswith("trash.")]
        seen.append(sum(len(os.listdir(os.path.join(tmp, b))) for b in bins))
    print(json.dumps(seen))
    """
    out = run_python(code, tmp_path, args=[str(tmp_path / "store")])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 0, 1]


def test_the_trash_of_a_setgid_store_is_group_writable(tmp_path: pathlib.Path) -> None:
    """In a group-shared (setgid) store the trash directory gets a build directory's group
    modes, so another member's `hfbuild gc` can remove it after a kill."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o2775)
    code = DEFER.replace(
        "print(json.dumps(sorted(os.listdir(tmp))))",
        "print(oct(os.stat(os.path.join(tmp, os.listdir(tmp)[0])).st_mode & 0o7777))",
    )
    assert code != DEFER
    out = run_python(f"import os; os.umask(0o022)\n{code}", tmp_path, args=[str(tmp), "1"])
    assert int(out.stdout.strip().splitlines()[-1], 8) & 0o2770 == 0o2770
