"""Text helpers used by the demo transforms."""

from __future__ import annotations

import re

_SPACES = re.compile(r"[ \t]+")
_BLANK = re.compile(r"\n\s*\n")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with runs of spaces folded and ends stripped."""
    out = []
    for block in _BLANK.split(text):
        lines = [_SPACES.sub(" ", line).strip() for line in block.splitlines()]
        para = " ".join(line for line in lines if line)
        if para:
            out.append(para)
    return out
