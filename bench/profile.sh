#!/bin/sh
# Where does pgdoorman's CPU go under load?  py-spy flame graphs and top lists of functions.
#
#   bench/profile.sh [OUTDIR] [bench/run.py options...]
#
# OUTDIR defaults to .tmp/profile (ignored by git).  Starts a throwaway cluster and pgdoorman on
# CPython (py-spy reads CPython's memory only, not PyPy's), measures -S -c 50 for each mode
# like bench/run.py does, then runs pgbench once more per mode with py-spy attached and writes
# OUTDIR/pgdoorman-select-MODE-c50.svg (flame graph: open it in a browser),
# OUTDIR/...top.txt (functions by self and total samples) and OUTDIR/....raw (collapsed stacks,
# for speedscope or flamegraph.pl).  Installs py-spy into .venv from PyPI when missing.
# Extra options go to bench/run.py, e.g. --profile-native (C frames too), --profile-duration 20,
# --modes extended, --clients 200, --targets pgbouncer,pgdoorman (a PgBouncer row to compare).
# --pypy adds pgdoorman on PyPy profiled with vmprof (CPU time; py-spy cannot read PyPy):
# OUTDIR/pgdoorman-pypy-...vmprof and ...top.txt; vmprof is installed into .venv-pypy if missing.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=.tmp/profile
case "${1:-}" in
    ""|-*) ;;
    *) OUT=$1; shift ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    make venv VENV="$VENV"
fi
if [ ! -x "$VENV/bin/py-spy" ]; then
    echo "profile.sh: pip install py-spy into $VENV" >&2
    "$VENV/bin/python" -m pip install -q py-spy
fi
TARGETS=pgdoorman
for a in "$@"; do
    if [ "$a" = --pypy ]; then
        TARGETS=pgdoorman,pgdoorman-pypy
        if [ -x .venv-pypy/bin/python ] && ! .venv-pypy/bin/python -c 'import vmprof' 2>/dev/null; then
            echo "profile.sh: pip install vmprof into .venv-pypy" >&2
            .venv-pypy/bin/python -m pip install -q vmprof
        fi
    fi
done
mkdir -p "$OUT"
exec "$VENV/bin/python" bench/run.py --targets "$TARGETS" --scripts select --clients 50 \
    --modes simple,extended,prepared --profile "$OUT" --markdown "$OUT/report.md" "$@"
