#!/usr/bin/env python3
"""Simulate a package upgrade on a directory tree, deterministically (fixed seed).

usage: upgrade_tree.py TREE

Deletes, edits in place, appends to, renames and adds files, roughly as an OS update
touching a few hundred packages does.
"""
import os
import random
import sys


def main():
    root = sys.argv[1]
    rng = random.Random(20261124)
    files = []
    for d, _, names in os.walk(root):
        for n in sorted(names):
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
    files.sort()
    rng.shuffle(files)
    n = len(files)
    cut = [int(n * f) for f in (0.03, 0.08, 0.13, 0.16, 0.20)]
    deleted, edited, appended, renamed, rewritten = (
        files[: cut[0]],
        files[cut[0] : cut[1]],
        files[cut[1] : cut[2]],
        files[cut[2] : cut[3]],
        files[cut[3] : cut[4]],
    )
    for p in deleted:
        os.remove(p)
    for p in edited:  # same length, a few bytes changed in place
        with open(p, "r+b") as f:
            data = bytearray(f.read())
            for _ in range(1 + len(data) // 8192):
                if data:
                    i = rng.randrange(len(data))
                    data[i : i + 8] = b"UPGRADED"[: len(data) - i]
            f.seek(0)
            f.write(data)
    for p in appended:
        with open(p, "ab") as f:
            f.write(("# appended by upgrade %d\n" % rng.randrange(1 << 30)).encode() * rng.randrange(1, 200))
    for i, p in enumerate(renamed):
        os.rename(p, p + ".renamed%d" % i)
    for p in rewritten:  # a new version: lines inserted near the start (content shifts)
        with open(p, "rb") as f:
            data = f.read()
        k = min(len(data), rng.randrange(0, 2048))
        with open(p, "wb") as f:
            f.write(data[:k] + b"# new in version 2\n" * rng.randrange(1, 20) + data[k:])
    newdir = os.path.join(root, "new-package")
    os.makedirs(newdir, exist_ok=True)
    total = 0
    i = 0
    while total < 12 * 1024 * 1024:
        size = rng.randrange(1000, 200000)
        words = [b"alpha", b"beta", b"gamma", b"delta", b"omega", b"\n", b"%d" % rng.randrange(1 << 20)]
        data = b" ".join(rng.choice(words) for _ in range(size // 5))
        with open(os.path.join(newdir, "file%04d" % i), "wb") as f:
            f.write(data)
        total += len(data)
        i += 1
    print("upgrade: %d files: %d deleted, %d edited, %d appended, %d renamed, %d rewritten, %d new (%d bytes)"
          % (n, len(deleted), len(edited), len(appended), len(renamed), len(rewritten), i, total))


if __name__ == "__main__":
    main()
