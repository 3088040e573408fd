"""What is on disk, by key: the store's entries, their checks and loading, the
trash, the shared modes and locks, hfbuild.lock's format, the remote cache.

Owns: every path under the store and the remote, and the lock file's reading and writing.
Must never: read the project's code or git, compute a key, or import a layer above it.
"""
