#!/bin/sh
# make deb: build dist/pgdoorman_<version>_all.deb with dpkg-buildpackage from packaging/debian.
# Installs the build dependencies with apt-get when they are missing (needs root then).
set -eu
cd "$(dirname "$0")/.."
# Debian's own python3 builds and runs the package, whatever python3 comes first in PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

ensure_packages() {
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-deb: missing build dependencies:$missing (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "build-deb: installing$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

ensure_packages dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
    python3-setuptools python3-wheel python3-yaml

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' pgdoorman/__init__.py)
build=build/deb
src=$build/pgdoorman-$version
rm -rf "$build"
mkdir -p "$src" dist
# Pure Python (packaging/README.md): no compiled scanner, nor a .so built in place by
# `pip install -e`.
tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' --exclude='*.pyx' \
    pgdoorman twisted setup.cfg pyproject.toml README.md docs packaging \
    | tar -xf - -C "$src"
cp -r packaging/debian "$src/debian"
cp packaging/pgdoorman.service "$src/debian/pgdoorman.service"
cp packaging/patroni_proxy.service "$src/debian/pgdoorman.patroni_proxy.service"
cp packaging/pgdoorman.logrotate "$src/debian/pgdoorman.logrotate"
# The version has one home, pgdoorman/__init__.py; the changelog is written from it.
cat > "$src/debian/changelog" <<EOF
pgdoorman ($version) unstable; urgency=medium

  * pgdoorman $version.

 -- pgdoorman maintainers <pgdoorman@users.noreply.github.com>  $(date -R)
EOF
(cd "$src" && dpkg-buildpackage -us -uc -b)
cp "$build/pgdoorman_${version}_all.deb" dist/
echo "build-deb: dist/pgdoorman_${version}_all.deb"
if command -v lintian >/dev/null; then
    lintian --fail-on error "dist/pgdoorman_${version}_all.deb"
fi
