#!/usr/bin/env bash
# `ota-tools create` on a realistic upgrade pair: ext4 images of twelve PyPI packages with
# native libraries at two close patch releases (pypi_pair.sh). Not part of CI: it
# downloads the wheels (once, cached in WORKDIR/wheels).
#
# usage: ota-tools/bench/pypi_bench.sh WORKDIR [OLD_OTA_TOOLS_BINARY]
#
# Measures, in one run, side by side:
#   * plain `lz4 -1` and `zstd -3` of the changed blocks (target blocks that differ from
#     the source block at the same position);
#   * the file-level bound: `bsdiff` of every changed file, summed (file_bsdiff.py);
#   * `create` (this tree's release build, and OLD_OTA_TOOLS_BINARY when given, e.g. a
#     build of main) for v3 lz4 / zstd at 64 KiB, v3 lz4 at 4 KiB, v2 lz4 and v2 gz: COW
#     size, wall and CPU time, peak RSS; every COW is checked with `verify`.
# Results go to WORKDIR/pypi-results.md. Needs: cargo, pip, python3, mke2fs, lz4, zstd,
# bsdiff, /usr/bin/time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:?usage: pypi_bench.sh WORKDIR [OLD_OTA_TOOLS_BINARY]}
old_bin=${2:-}
mkdir -p "$work"
"$here/pypi_pair.sh" "$work"
cd "$work"
cargo build -q --release -p ota-tools --manifest-path "$repo/Cargo.toml"
bin="$repo/target/release/ota-tools"
results="$work/pypi-results.md"
: >"$results"
say() { echo "$@" | tee -a "$results"; }

# Runs a command under /usr/bin/time; prints "WALL_S CPU_S MAXRSS_KIB".
timed() {
    /usr/bin/time -f "%e %U %S %M" -o "$work/time.txt" "$@" >"$work/cmd.out" 2>"$work/cmd.err" || {
        cat "$work/cmd.err" >&2
        return 1
    }
    read -r wall user sys rss <"$work/time.txt"
    echo "$wall $(echo "$user + $sys" | bc) $rss"
}

src=pypi-src.img
tgt=pypi-tgt.img
changed=$(python3 "$here/changed_blocks.py" "$src" "$tgt" changed.bin)
say "## pypi pair: $(($(stat -c %s "$tgt") / 1048576)) MiB images, $changed changed blocks"
say ""
say "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
say ""
say "| what | bytes | wall s | CPU s | peak RSS MiB |"
say "|---|---|---|---|---|"
read -r w c m < <(timed lz4 -1 -q -f changed.bin changed.lz4)
say "| plain lz4 -1 of changed blocks | $(stat -c %s changed.lz4) | $w | $c | $((m / 1024)) |"
read -r w c m < <(timed zstd -3 -q -f changed.bin -o changed.zst)
say "| plain zstd -3 of changed blocks | $(stat -c %s changed.zst) | $w | $c | $((m / 1024)) |"
if [[ ! -f bsdiff.txt ]]; then
    python3 "$here/file_bsdiff.py" tree-v1 tree-v2 >bsdiff.txt
fi
read -r nchanged nnew bchanged bnew <bsdiff.txt
say "| bsdiff of each changed file, summed ($nchanged changed files; $nnew new files add $bnew) | $bchanged | | | |"
for spec in "3 lz4 64k" "3 zstd 64k" "3 lz4 4k" "2 lz4 4k" "2 gz 4k"; do
    read -r ver comp factor <<<"$spec"
    for which in new old; do
        b=$bin
        if [[ $which == old ]]; then
            [[ -n $old_bin ]] || continue
            b=$old_bin
        fi
        read -r w c m < <(timed "$b" create --source "$src" --target "$tgt" --output "$which.cow" \
            --cow-version "$ver" --compression "$comp" --compression-factor "$factor")
        say "| create ($which) v$ver $comp $factor | $(stat -c %s "$which.cow") | $w | $c | $((m / 1024)) |"
        echo "    $(head -1 "$work/cmd.out")" >>"$results"
        "$bin" verify --source "$src" --target "$tgt" --cow "$which.cow" >/dev/null
    done
done
say ""
say "verify passed for every COW above."
echo "results in $results"
