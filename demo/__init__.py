"""The demo pipeline's transforms (see dodo.py)."""
