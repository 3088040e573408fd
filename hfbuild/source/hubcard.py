"""A Hugging Face dataset card's configurations, as `datasets.load_dataset(repo, name)` reads them.

Owns: a Hub dataset's card (README.md, updated by `.huggingface.yaml`) at a commit, parsed by
huggingface_hub (offline the cache's snapshot, or its `.no_exist` mark that the repository has
none; online downloaded: `_download_card`, one documented Hub call), and the configuration a
load applies (`card_config`): datasets' `MetadataConfigs` rules (configs by `config_name`, the
default one), `sanitize_patterns` (a split dict in the card's order), `data_dir` joined,
builder keyword arguments, features (`dataset_info` of that config, else the config's own; the
card's YAML list, which datasets reads at build time). Re-stated here, over huggingface_hub's
parse, since a key may not import `datasets`; tests compare each with plain `load_dataset`.
The commit the card was read at travels as a load option that is never keyed (`CARD_COMMIT`).

Must never: key the card itself (only what a configuration resolves to), read, store or print
a token, or import `datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hfbuild.source import hub

# A load option: the commit whose dataset card gave a stage its configuration. Never keyed
# (the key holds what the configuration resolved to); the key's resolution checks that the
# revision still resolves to it, so a card and files of two commits never meet.
CARD_COMMIT = "hub_card_commit"
# datasets' `configs:` parameters that are not builder keyword arguments.
_NOT_KWARGS = ("config_name", "default", "data_files", "data_dir", "features")


@dataclass(frozen=True)
class CardConfig:
    """A configuration of a dataset card as `datasets.load_dataset(repo, name)` builds it:
    its data files (patterns relative to the repository, `data_dir` joined; a split dict as
    datasets' `sanitize_patterns` makes it, or None where the user's own replace them), its
    builder keyword arguments, its features (the card's YAML list, which datasets'
    `Features._from_yaml_list` reads at build time; None: inferred), and the first
    configuration's data files (datasets infers one builder for all configurations from
    them)."""

    name: str
    data_files: Any
    kwargs: dict[str, Any]
    features: list[Any] | None
    first: Any


def _card(repo: str, commit: str, revision: str) -> dict[str, Any]:
    """The YAML of `repo`'s dataset card at `commit` (README.md, updated with the standalone
    `.huggingface.yaml` as datasets does), parsed by huggingface_hub; {} without a card."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    found = {n: _card_file(repo, commit, revision, n) for n in ("README.md", ".huggingface.yaml")}
    data: dict[str, Any] = {}
    if found["README.md"] is not None:
        try:
            with open(found["README.md"], encoding="utf-8") as f:
                text = f.read()
            # A card without YAML has no data (huggingface_hub would warn on each check).
            if REGEX_YAML_BLOCK.search(text):
                data = DatasetCard(text).data.to_dict()  # type: ignore[no-untyped-call]
        except Exception as e:
            raise hub.HubError(
                f"the dataset card (README.md) of {repo} at commit {commit} cannot be read: "
                f"{type(e).__name__}: {' '.join(str(e).split())}"
            ) from None
    if found[".huggingface.yaml"] is not None:
        import yaml  # type: ignore[import-untyped]

        with open(found[".huggingface.yaml"], encoding="utf-8") as f:
            extra = yaml.safe_load(f.read())
        if isinstance(extra, dict):
            data.update(extra)
    return data


def _card_file(repo: str, commit: str, revision: str, name: str) -> str | None:
    """A card file's path at `commit`, None where the repository has none. Offline: the
    snapshot's, or huggingface_hub's `.no_exist` mark that it has none (the README of a
    snapshot that has neither is an error that says what to do); online, downloaded."""
    path = os.path.join(hub.snapshot_dir(repo, commit), name)
    if os.path.exists(path):
        return path
    if os.path.exists(os.path.join(hub.repo_dir(repo), ".no_exist", commit, name)):
        return None
    if not hub.offline():
        return _download_card(repo, commit, name)
    if name != "README.md":
        return None  # datasets reads it only where it exists
    hub.cached_files(repo, commit, revision)  # a snapshot the cache lacks: its own error
    raise hub.HubError(
        f"the dataset card (README.md) of {repo} at commit {commit} is not in the local Hub "
        f"cache ({hub.cache_dir()}): {hub.fetch_advice(repo, commit)}."
    )


def _split_dict(value: Any, what: str) -> dict[str, Any]:
    """A configuration's `data_files` as datasets' `sanitize_patterns` makes it: a split
    dict in the card's order (a pattern or list of them: the "train" split)."""
    bad = hub.HubError(
        f"{what}: data_files {value!r} of the dataset card: expected a string, a list of "
        f"strings, or a list of dicts with two keys, 'split' and 'path' (datasets' rule)."
    )
    if isinstance(value, str):
        return {"train": [value]}
    if not isinstance(value, list):
        raise bad
    if not any(isinstance(v, dict) for v in value):
        if not all(isinstance(v, str) for v in value):
            raise bad
        return {"train": list(value)}
    out: dict[str, Any] = {}
    for v in value:
        if not (
            isinstance(v, dict)
            and set(v) == {"split", "path"}
            and isinstance(v["path"], (str, list))
            and str(v["split"]) not in out
        ):
            raise bad
        out[str(v["split"])] = v["path"] if isinstance(v["path"], list) else [v["path"]]
    return out


def _under(data_dir: str | None, files: dict[str, Any]) -> dict[str, Any]:
    if not data_dir:
        return files
    top = data_dir.strip("/")
    return {k: [f"{top}/{p.lstrip('/')}" for p in v] for k, v in files.items()}


def card_config(
    repo: str, revision: str, name: str | None, given_files: bool, what: str
) -> tuple[str, CardConfig | None]:
    """The commit `revision` resolves to, and the configuration of its dataset card a load
    `datasets.load_dataset(repo, name, data_files=...)` builds (datasets' `MetadataConfigs`
    rules: each `configs:` entry names a `config_name`; with no `name`, the default one: the
    only one, the one named "default" or marked `default: true`). `given_files`: the user
    passes data_files, which then replace the configuration's, and the card's
    `dataset_info` is not used (as datasets does). None: no configuration applies (a card
    without `configs:`, or several and no default while the user gives data_files)."""
    try:
        commit = hub.commit_of(repo, revision)
        data = _card(repo, commit, revision)
    except hub.HubError as e:
        raise hub.HubError(f"{what}: {e}") from None
    raw = data.get("configs")
    configs: dict[str, dict[str, Any]] = {}
    if raw:
        if not isinstance(raw, list):
            raise hub.HubError(
                f"{what}: {repo}'s card: expected configs to be a list, got {raw!r}."
            )
        for c in raw:
            if not isinstance(c, dict) or "config_name" not in c:
                raise hub.HubError(
                    f"{what}: {repo}'s card: each config must include a `config_name` field, "
                    f"got {c!r}."
                )
            c = dict(c)
            configs[str(c.pop("config_name"))] = c
    defaults = [
        n for n, c in configs.items() if len(configs) == 1 or n == "default" or c.get("default")
    ]
    if len(defaults) > 1:
        raise hub.HubError(
            f"{what}: {repo}'s card has several default configs: '{defaults[0]}' and "
            f"'{defaults[1]}'."
        )
    if name is None:
        if not configs or (not defaults and given_files):
            return commit, None
        if not defaults:
            raise hub.HubError(
                f"{what}: Config name is missing: please pick one among the available configs "
                f"of {repo}: {list(configs)} (name=...)."
            )
        name = defaults[0]
    if name not in configs:
        raise hub.HubError(
            f"{what}: BuilderConfig '{name}' not found. Available: {list(configs)} "
            f"(the configs of {repo}'s card at commit {commit[:12]})."
        )
    conf = configs[name]
    files = None
    if not given_files:
        if conf.get("data_files") is None:
            raise hub.HubError(
                f"{what}: the config {name!r} of {repo}'s card names no data_files (datasets "
                f"then infers them from the repository's layout, which hfbuild does not): "
                f"pass data_files=."
            )
        files = _under(conf.get("data_dir"), _split_dict(conf["data_files"], what))
    first_conf = next(iter(configs.values()))
    first = (  # datasets reads the first config's patterns only for their extensions
        _split_dict(first_conf["data_files"], what)
        if first_conf.get("data_files") is not None
        else files
    )
    features = conf.get("features")
    infos = data.get("dataset_info")
    if isinstance(infos, dict):
        infos = [infos]
    info = {str(i.get("config_name", "default")): i for i in infos or [] if isinstance(i, dict)}
    if not given_files and name in info:
        features = info[name].get("features")  # datasets' info replaces the config's
    kwargs = {k: v for k, v in conf.items() if k not in _NOT_KWARGS}
    return commit, CardConfig(name, files, kwargs, features, first)


def card_commit_moved(pins: Iterable[hub.Pin], commit: str) -> hub.Pin | None:
    """Of a card configuration's pins (one repository's), one that resolved to another
    commit than its card was read at."""
    return next((p for p in pins if p.commit != commit), None)


# -- online only (no test reaches the Hub) ----------------------------------------------------


def _download_card(repo: str, commit: str, name: str) -> str | None:
    """GET /datasets/{repo}/resolve/{commit}/{name} (`hf_hub_download`): a card file's
    path in the cache, None where the repository has none (404: EntryNotFoundError)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return str(hf_hub_download(repo, name, repo_type="dataset", revision=commit))
    except EntryNotFoundError:
        return None
