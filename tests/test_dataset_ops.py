"""hfbuild.map / hfbuild.filter: plain datasets code with a fingerprint that follows the code."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.helpers import Repo, run_python

SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import datasets, hfbuild
from pkg.transforms import featurize, keep
ds = datasets.load_dataset("parquet", data_files="data/x.parquet", split="train",
                           cache_dir=sys.argv[1])
out = hfbuild.map(ds, featurize, {"k": 1}, batched=True, num_proc=None)
out = hfbuild.filter(out, keep)
print(json.dumps(list(out["y"])))
"""


@pytest.fixture
def project(repo: Repo) -> Repo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(
        {
            "pkg/__init__.py": "",
            "pkg/helpers.py": "SCALE = 2\n\ndef double(x):\n    return x * SCALE\n",
            "pkg/transforms.py": """
                import os
                from pkg.helpers import double

                def _log(name):
                    with open(os.environ["CALL_LOG"], "a") as f:
                        f.write(name + "\\n")

                def featurize(batch, k=1):
                    _log("featurize")
                    return {"y": [double(x) + k for x in batch["x"]]}

                def keep(example):
                    _log("keep")
                    return example["y"] % 3 != 0
                """,
        }
    )
    (repo.path / "data").mkdir()
    pq.write_table(pa.table({"x": list(range(20))}), repo.path / "data/x.parquet")
    repo.commit("init")
    return repo


def run(project: Repo, cache: pathlib.Path, log: pathlib.Path) -> list[int]:
    out = run_python(SCRIPT, project.path, env={"CALL_LOG": str(log)}, args=[str(cache)])
    result: list[int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def calls(log: pathlib.Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_cache_hit_across_processes_and_rebuild_after_helper_edit(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """A second process reuses the cached map and filter results; after editing a helper in
    another module (and committing), the map reruns and the output is the new one, where
    plain `datasets` would serve the stale cache."""
    cache, log = tmp_path / "hf-cache", tmp_path / "calls.log"
    first = run(project, cache, log)
    expected = [2 * x + 1 for x in range(20) if (2 * x + 1) % 3 != 0]
    assert first == expected
    n = len(calls(log))
    assert n > 0

    assert run(project, cache, log) == expected
    assert len(calls(log)) == n  # served from the cache: no call at all

    project.write({"pkg/helpers.py": "SCALE = 3\n\ndef double(x):\n    return x * SCALE\n"})
    project.commit("scale 3")
    third = run(project, cache, log)
    assert third == [3 * x + 1 for x in range(20) if (3 * x + 1) % 3 != 0]
    assert "featurize" in calls(log)[n:]


def test_dataset_dict_maps_split_by_split(project: Repo, tmp_path: pathlib.Path) -> None:
    """hfbuild.map on a DatasetDict maps each split with its own fingerprint."""
    code = """
import json, sys, warnings, os
warnings.simplefilter("ignore")
import datasets, hfbuild
from pkg.transforms import featurize
dd = datasets.DatasetDict({"a": datasets.Dataset.from_dict({"x": [1, 2]}),
                           "b": datasets.Dataset.from_dict({"x": [3]})})
out = hfbuild.map(dd, featurize, {"k": 0}, batched=True)
print(json.dumps({k: [list(v["y"]), v._fingerprint] for k, v in out.items()}))
"""
    out = run_python(code, project.path, env={"CALL_LOG": str(tmp_path / "log")})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["a"][0] == [2, 4] and got["b"][0] == [6]
    assert got["a"][1] != got["b"][1]
