"""hfbuild's version, written into every stored manifest.

Owns: the version string alone, so that modules below the package's face can name it.
Must never: import anything of hfbuild.
"""

__version__ = "0.1.0"
