"""
The one thing setup.cfg cannot say: the optional compiled framing scanner
(pgdoorman/protocol/_cframing.pyx, see pgdoorman/protocol/framing.py).

It is built on CPython when Cython and a C compiler are there, and skipped otherwise: a failed
build warns and installs pure Python, which runs the same (only slower).  PGDOORMAN_PURE_PYTHON=1
skips it on purpose (the .deb and .rpm are built that way: architecture-independent packages).
Generated files (the .c) go to build/, never into the source tree.
"""

import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext whose failure is a warning: pgdoorman runs without the extension."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler, no headers, ...
            self._skipped(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._skipped(e)

    def _skipped(self, error):
        sys.stderr.write("pgdoorman: the compiled framing scanner was not built (%s); the "
                         "pure-Python one is used\n" % (error,))


def extensions():
    if platform.python_implementation() != "CPython" or \
            os.environ.get("PGDOORMAN_PURE_PYTHON", "") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("pgdoorman: Cython is not installed; the compiled framing scanner "
                         "is not built\n")
        return []
    try:
        return cythonize(["pgdoorman/protocol/_cframing.pyx"], build_dir="build/cython",
                         language_level=3, quiet=True)
    except Exception as e:
        sys.stderr.write("pgdoorman: Cython failed (%s); the compiled framing scanner is not "
                         "built\n" % (e,))
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
