"""
Which interpreter runs pgdoorman: C{PGDOORMAN_RUNTIME} (issue 14).

On PyPy pgdoorman spends much less CPU per transaction than on CPython (bench/run.py --pypy
measures both), but Debian 12 has no Twisted for PyPy: the PyPy runtime is a venv of PyPI
packages the operator creates (C{/usr/lib/pgdoorman/pypy-setup}, see packaging/README.md),
while the packages' own dependencies are Debian's CPython ones.  So the command starts on
CPython and, when asked to, replaces itself with the PyPy venv's interpreter before doing
anything else:

    PGDOORMAN_RUNTIME=auto     PyPy when $PGDOORMAN_PYPY exists, CPython otherwise
    PGDOORMAN_RUNTIME=pypy     PyPy, or exit 1 saying why not
    PGDOORMAN_RUNTIME=python3  (or unset, or "cpython") this interpreter, as before

C{PGDOORMAN_PYPY} is the interpreter, by default C{/var/lib/pgdoorman/pypy/bin/python}.  The
packages' systemd unit reads both from C{/etc/default/pgdoorman}.  This runs once per command,
never per message.
"""

import os
import platform
import sys

DEFAULT_PYPY = "/var/lib/pgdoorman/pypy/bin/python"
_MARK = "_PGDOORMAN_RUNTIME_EXEC"  # set across the exec: say once what we run on


def _fail(message):
    print("pgdoorman: %s" % message, file=sys.stderr)
    raise SystemExit(1)


def select(argv, environ=None, execv=os.execv):
    """
    Replace this process with PyPy when C{PGDOORMAN_RUNTIME} asks for it; return otherwise.
    C{argv} is the command's arguments (without the program name).
    """
    environ = os.environ if environ is None else environ
    if environ.pop(_MARK, None) is not None:
        if platform.python_implementation() != "PyPy":
            _fail("PGDOORMAN_PYPY=%s is not PyPy (%s %s)" % (
                sys.executable, platform.python_implementation(), platform.python_version()))
        print("pgdoorman: running on PyPy %s (%s)" % (platform.python_version(),
                                                     sys.executable), file=sys.stderr)
        return
    wanted = (environ.get("PGDOORMAN_RUNTIME") or "python3").strip().lower()
    if wanted in ("python3", "cpython", "python"):
        return
    if wanted not in ("auto", "pypy"):
        _fail("PGDOORMAN_RUNTIME must be auto, pypy or python3, not %r"
              % environ["PGDOORMAN_RUNTIME"])
    if platform.python_implementation() == "PyPy":
        return
    pypy = environ.get("PGDOORMAN_PYPY") or DEFAULT_PYPY
    if not os.access(pypy, os.X_OK):
        if wanted == "auto":
            return
        _fail("PGDOORMAN_RUNTIME=pypy but PGDOORMAN_PYPY=%s is not an executable; create it with "
              "/usr/lib/pgdoorman/pypy-setup (packages) or tools/test-deps.sh (.venv-pypy)"
              % pypy)
    environ[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    execv(pypy, [pypy, "-m", "pgdoorman"] + list(argv))
