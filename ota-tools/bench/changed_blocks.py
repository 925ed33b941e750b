#!/usr/bin/env python3
"""Write the target blocks that differ from the source block at the same position (or lie
beyond the source) to OUT, concatenated: the input of the "plain compression" baseline.

usage: changed_blocks.py SRC.img TGT.img OUT
"""
import sys

BS = 4096


def main():
    src, tgt, out = sys.argv[1:4]
    n = 0
    with open(src, "rb") as s, open(tgt, "rb") as t, open(out, "wb") as o:
        while True:
            tb = t.read(BS * 256)
            if not tb:
                break
            sb = s.read(len(tb))
            for i in range(0, len(tb), BS):
                if tb[i : i + BS] != sb[i : i + BS]:
                    o.write(tb[i : i + BS])
                    n += 1
    print(n)


if __name__ == "__main__":
    main()
