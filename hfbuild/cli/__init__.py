"""The `hfbuild` command: parsing and the one error boundary (`main`), one module per
subcommand (`commands/`), and what only they use: the pipeline a command works on
(`project`), status and explain's report, verify's checks, the pipeline's picture (`graph`).

Owns: printing and exit codes.
Must never: hold logic the library needs, or import a frontend.
"""
