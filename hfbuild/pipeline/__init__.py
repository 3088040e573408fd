"""The pipeline: stages and their manifests from one snapshot, each stage's
lock entry and ref in step with the store, rewriting the lock, the no-import record.

Owns: the `Pipeline` object; the layers below get values or callables from it, never it.
Must never: build, or import above it.
"""
