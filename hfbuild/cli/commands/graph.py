from __future__ import annotations

import os

from hfbuild.cli import graph as pictures
from hfbuild.cli.commands.gc import stage_sizes
from hfbuild.cli.report import stage_states
from hfbuild.core.errors import HfbuildError
from hfbuild.pipeline.pipeline import Pipeline


def nodes(pipe: Pipeline) -> list[pictures.Node]:
    """Each stage as `hfbuild status` reports it (`report.stage_states`), with its inputs,
    size (`du`'s count), shards stored of its current key's, and where it came from."""
    ms = pipe.manifests()
    sizes, _ = stage_sizes(pipe)
    out = []
    for s in stage_states(pipe):
        spec = pipe[s.stage].spec
        m = ms[s.stage] if ms.error(s.stage) is None else None
        shards: tuple[int | None, int] | None = None
        if m is not None:
            listed = (pipe.store.read_manifest(m.fingerprint) or {}).get("shards")
            if pipe.store.has(m.fingerprint) and isinstance(listed, list):
                shards = (len(listed), len(listed))
            elif m.shards is not None and m.pending:  # its shard keys wait for an input
                shards = (None, len(m.shards))
            elif m.shards is not None:
                keys = [x.key for x in m.shard_list]
                last = pipe.store.get_ref(s.stage)  # its last list: where a packed shard is
                shards = (sum(1 for k in keys if pipe.store.has_shard(k, last)), len(keys))
        out.append(
            pictures.Node(
                stage=s.stage,
                kind=spec.kind,
                inputs=tuple(spec.inputs),
                state=s.state,
                reason=s.reason,
                dirty_files=tuple(s.dirty_files),
                rows=s.rows,
                size=sizes.get(s.stage),
                shards=shards,
                origin=pictures.origin(
                    spec.kind, spec.options, m.doc if m else {}, spec.ref, m.hub if m else ()
                ),
                pending=m.pending[0] if m is not None and m.pending else None,
            )
        )
    return out


def graph(pipe: Pipeline, *, fmt: str = "mermaid", html: str | None = None) -> int:
    """Print the stage graph as Mermaid, DOT or JSON; with `html`, write the page there and
    say so instead. Exit 0 whatever the stages' states (`status` is the check)."""
    got = nodes(pipe)
    if html is not None:
        try:
            with open(html, "w", encoding="utf-8") as f:
                f.write(pictures.page(got, f"hfbuild graph: {pipe.name}"))
        except OSError as e:
            raise HfbuildError(
                f"cannot write the graph page to {html}: {e.strerror}. Name a file in an "
                f"existing directory you can write to."
            ) from None
        print(f"wrote {os.path.abspath(html)} ({len(got)} stages)")
        return 0
    if fmt == "dot":
        print(pictures.dot(got, pipe.name), end="")
    elif fmt == "json":
        print(pictures.as_json(got), end="")
    else:
        print(pictures.mermaid(got), end="")
    return 0
