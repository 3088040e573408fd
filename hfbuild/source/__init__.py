"""The project as git and Python see it: git state and blob ids, the code cache,
the import graph, a callable's closure and what was loaded, data files, environment variables,
and what a build is seen to read (audit hook, inotify); data files on the Hub.

Owns: every read of the project's files and of git (pygit2 only in `gitstate`).
Must never: compute a key or a manifest, write to the store's entries, or import above it.
"""
