"""Values and rules every layer shares: the error family, the stage spec, the
canonical encoding, the project's settings, progress and teardown, hfbuild's version.

Owns: what has no other home and needs no other part of hfbuild.
Must never: import another hfbuild package, touch the store, git or the user's code.
"""
