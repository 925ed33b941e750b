#!/usr/bin/env bash
# Build a realistic, byte-reproducible ext4 upgrade pair from real PyPI packages.
#
# usage: ota-tools/bench/pypi_pair.sh WORKDIR
#
# Downloads twelve packages with native libraries (manylinux x86_64 wheels for CPython
# 3.11, whatever the local Python is) at two close patch releases, unpacks each release
# set into one tree (tree-v1, tree-v2) and packs each tree into an ext4 image
# (pypi-src.img, pypi-tgt.img) with a fixed UUID, hash seed, file timestamps (ctime and atime
# pinned with debugfs afterwards) and mke2fs clock, so the images are the same bytes on every run
# (checked: two builds in different directories give identical sha256). Wheels are cached in
# WORKDIR/wheels; the images are rebuilt only when missing.
# Needs: pip, python3, mke2fs and debugfs (e2fsprogs >= 1.43).
set -euo pipefail
work=${1:?usage: pypi_pair.sh WORKDIR}
mkdir -p "$work/wheels"
cd "$work"

# package old-version new-version
pairs=(
    "numpy 1.26.3 1.26.4"
    "scipy 1.11.3 1.11.4"
    "pandas 2.1.3 2.1.4"
    "pillow 10.0.0 10.0.1"
    "lxml 4.9.3 4.9.4"
    "cryptography 41.0.6 41.0.7"
    "grpcio 1.60.0 1.60.1"
    "matplotlib 3.8.1 3.8.2"
    "scikit-learn 1.3.1 1.3.2"
    "pyzmq 25.1.1 25.1.2"
    "pydantic-core 2.14.5 2.14.6"
    "psycopg2-binary 2.9.8 2.9.9"
)

fetch() {
    local pkg=$1 ver=$2 dest=$3
    mkdir -p "$dest"
    if ls "$dest"/*.whl >/dev/null 2>&1; then return; fi
    pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$dest" "$pkg==$ver"
}

if [[ ! -f pypi-src.img || ! -f pypi-tgt.img ]]; then
    rm -rf tree-v1 tree-v2
    for p in "${pairs[@]}"; do
        read -r pkg old new <<<"$p"
        for v in 1 2; do
            ver=$old
            [[ $v == 2 ]] && ver=$new
            fetch "$pkg" "$ver" "wheels/$pkg-$ver"
            mkdir -p "tree-v$v/site-packages"
            for w in "wheels/$pkg-$ver"/*.whl; do
                python3 -m zipfile -e "$w" "tree-v$v/site-packages"
            done
        done
    done
    # Fixed file times and modes independent of umask, so mke2fs sees the same inputs.
    for v in 1 2; do
        find "tree-v$v" -type d -exec chmod 0755 {} +
        find "tree-v$v" -type f -exec chmod 0644 {} +
        find "tree-v$v" -exec touch -h -d @1700000000 {} +
    done
    mb=$(du -sm tree-v2 | cut -f1)
    mb=$((mb * 13 / 10 + 32))
    export E2FSPROGS_FAKE_TIME=1700000000 SOURCE_DATE_EPOCH=1700000000
    for v in 1 2; do
        out=pypi-src.img
        [[ $v == 2 ]] && out=pypi-tgt.img
        rm -f "$out"
        mke2fs -q -F -t ext4 -b 4096 -U 6c1f2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b \
            -E hash_seed=1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d,root_owner=0:0 \
            -d "tree-v$v" "$out" "${mb}M"
        # mke2fs copies each inode's ctime and atime from the host file: the first cannot
        # be set, the second changes as files are read (relatime). Pin both (and the
        # root's and lost+found's) with debugfs.
        {
            printf '/\n/lost+found\n'
            (cd "tree-v$v" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.||')
        } | sed -e 's|.*|sif "&" ctime 1700000000\nsif "&" atime 1700000000|' >"ctime-v$v.cmds"
        debugfs -w -f "ctime-v$v.cmds" "$out" >/dev/null 2>"ctime-v$v.log"
        if grep -qv '^debugfs' "ctime-v$v.log"; then
            cat "ctime-v$v.log" >&2
            exit 1
        fi
    done
fi
echo "pypi pair: $(du -sm tree-v1 | cut -f1) MiB -> $(du -sm tree-v2 | cut -f1) MiB of files," \
    "images $(($(stat -c %s pypi-tgt.img) / 1048576)) MiB"
