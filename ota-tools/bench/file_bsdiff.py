#!/usr/bin/env python3
"""File-level diff bound of an upgrade: the summed size of `bsdiff OLD NEW PATCH` over
the files of NEW_TREE that differ from their old version in OLD_TREE. The old version is
the same path, or else the old file whose path is the same once version numbers and
8-hex-digit build hashes are blanked (`numpy-1.26.3.dist-info/RECORD`,
`Pillow.libs/libjpeg-6d18ab84.so.62.3.0`). Files with no old version cost
`bsdiff ONE_BYTE NEW` (a bzip2 of the file, in effect; bsdiff cannot map an empty file).
Equal files and deleted files cost nothing. This is what a file-aware diff tool would
ship: the lower bound a block-level COW can approach.

usage: file_bsdiff.py OLD_TREE NEW_TREE
prints: "<changed files> <new files> <bsdiff bytes of changed> <bytes of new>"
"""
import os
import re
import subprocess
import sys
import tempfile


def blank(rel):
    """The path with version numbers and build hashes blanked."""
    rel = re.sub(r"[0-9a-f]{8}", "H", rel)
    return re.sub(r"\d+(\.\d+)+", "V", rel)


def main():
    old, new = sys.argv[1:3]
    renamed = {}
    for root, _dirs, files in os.walk(old):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), old)
            renamed.setdefault(blank(rel), os.path.join(old, rel))
    changed = added = changed_bytes = added_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        patch = os.path.join(tmp, "p")
        empty = os.path.join(tmp, "empty")
        with open(empty, "wb") as e:
            e.write(b"\0")
        for root, _dirs, files in os.walk(new):
            for name in sorted(files):
                n = os.path.join(root, name)
                rel = os.path.relpath(n, new)
                o = os.path.join(old, rel)
                if os.path.islink(n) or not os.path.isfile(n):
                    continue
                if not os.path.isfile(o):
                    o = renamed.get(blank(rel), o)
                if os.path.isfile(o):
                    with open(o, "rb") as a, open(n, "rb") as b:
                        if a.read() == b.read():
                            continue
                    base = o
                    changed += 1
                else:
                    base = empty
                    added += 1
                subprocess.run(["bsdiff", base, n, patch], check=True)
                size = os.path.getsize(patch)
                if base == empty:
                    added_bytes += size
                else:
                    changed_bytes += size
    print(changed, added, changed_bytes, added_bytes)


if __name__ == "__main__":
    main()
