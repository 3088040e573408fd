"""Building a stage whose result the store lacks: the order of a build, the
transform run with `datasets`, sharded stages and their units, the executors (here, Ray).

Owns: making and publishing results.
Must never: decide freshness from anything but the store holding the key, or import a
frontend or the CLI.
"""
