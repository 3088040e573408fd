"""How a user's program drives hfbuild: doit task dicts (`pipe.tasks()`)
and the drop-in `hfbuild.map` / `hfbuild.filter`.

Owns: the shapes doit and `datasets` expect.
Must never: print, or import the CLI.
"""
