#!/usr/bin/env python3
"""File-level diff bound of an upgrade: the summed size of `bsdiff OLD NEW PATCH` over
the files of NEW_TREE that differ from the same path in OLD_TREE, plus `bsdiff ONE_BYTE
NEW` (a bzip2 of the file, in effect; bsdiff cannot map an empty file) for files that are new. Files equal in both trees
cost nothing; deleted files cost nothing. This is what a file-aware diff tool would ship:
the lower bound a block-level COW can approach.

usage: file_bsdiff.py OLD_TREE NEW_TREE
prints: "<changed files> <new files> <bsdiff bytes of changed> <bytes of new>"
"""
import os
import subprocess
import sys
import tempfile


def main():
    old, new = sys.argv[1:3]
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
