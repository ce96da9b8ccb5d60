#!/bin/sh
# make rpm: build dist/pgdoorman-<version>-1.noarch.rpm with rpmbuild -bb from
# packaging/rpm/pgdoorman.spec.  Installs rpm with apt-get when missing (needs root then).
set -eu
cd "$(dirname "$0")/.."
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

if ! command -v rpmbuild >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-rpm: rpmbuild is missing (run as root, or apt-get install rpm)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rpm
fi

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' pgdoorman/__init__.py)
top=$(pwd)/build/rpm
rm -rf "$top"
mkdir -p "$top/SOURCES" "$top/stage/pgdoorman-$version" dist
# Pure Python (packaging/README.md): no compiled scanner, nor a .so built in place by
# `pip install -e`.
tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' --exclude='*.pyx' \
    pgdoorman twisted setup.cfg pyproject.toml README.md docs packaging \
    | tar -xf - -C "$top/stage/pgdoorman-$version"
tar -czf "$top/SOURCES/pgdoorman-$version.tar.gz" -C "$top/stage" "pgdoorman-$version"
rpmbuild -bb --define "_topdir $top" --define "version $version" \
    --define "_build_id_links none" packaging/rpm/pgdoorman.spec
cp "$top/RPMS/noarch/pgdoorman-$version-1.noarch.rpm" dist/
echo "build-rpm: dist/pgdoorman-$version-1.noarch.rpm"
