"""Manifests and the keys they give: the static fingerprint, the full key over
what builds read, sharding keys, the inputs' results a key holds, data absent from the
checkout, and the difference between two manifests.

Owns: what goes into a key, and nothing that builds.
Must never: import `datasets`, receive the `Pipeline`, or import above it.
"""
