#!/usr/bin/env python3
"""A synthetic image pair (deterministic): compressible text-like blocks, random blocks and
zero runs in the source; the target shifts runs up and down, swaps and rotates blocks,
edits blocks in place, copies a block to many places and adds new data.

usage: synthetic_pair.py SRC.img TGT.img MiB
"""
import random
import sys

BS = 4096


def main():
    src, tgt, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(7)
    n = mib * 256
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"\n", b"0x1234 "]
    pool = b"".join(rng.choice(words) for _ in range(200000))
    blocks = []
    for i in range(n):
        r = rng.random()
        if r < 0.6:
            o = rng.randrange(len(pool) - BS)
            blocks.append(pool[o : o + BS])
        elif r < 0.8:
            blocks.append(rng.randbytes(BS))
        else:
            blocks.append(bytes(BS))
    t = list(blocks)
    # Long runs shifted up and down.
    for start, length, shift in [(1000, 5000, 3), (9000, 4000, -17), (20000, 3000, 250)]:
        for k in range(length):
            d = start + k
            s = d - shift
            if 0 <= d < n and 0 <= s < n:
                t[d] = blocks[s]
    # Swaps and rotations.
    for _ in range(200):
        a, b = rng.randrange(n), rng.randrange(n)
        t[a], t[b] = blocks[b], blocks[a]
    for _ in range(20):
        a = rng.randrange(n - 64)
        for k in range(64):
            t[a + k] = blocks[a + (k + 1) % 64]
    # In-place edits (XOR candidates), a block copied to many places, new data.
    for _ in range(n // 50):
        a = rng.randrange(n)
        b = bytearray(t[a])
        o = rng.randrange(BS - 32)
        b[o : o + 32] = rng.randbytes(32)
        t[a] = bytes(b)
    for _ in range(300):
        t[rng.randrange(n)] = blocks[5]
    for _ in range(n // 40):
        o = rng.randrange(len(pool) - BS)
        t[rng.randrange(n)] = pool[o : o + BS][::-1]
    with open(src, "wb") as f:
        f.write(b"".join(blocks))
    with open(tgt, "wb") as f:
        f.write(b"".join(t))


if __name__ == "__main__":
    main()
