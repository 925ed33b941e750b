#!/usr/bin/env bash
# Benchmark of `ota-tools payload` (figures for BENCHMARKS.md).
#
# usage: ota-tools/bench/payload_bench.sh [WORKDIR]
#
# 1. A synthetic image pair (synthetic_pair.py, PAYLOAD_BENCH_MIB MiB, default 256):
#    `payload create` (incremental), `payload extract`, `payload to-cow`, next to
#    `ota-tools create` of a COW for the same pair: times, sizes, peak RSS.
# 2. Full payloads of the target with only REPLACE_XZ, then only REPLACE_BZ: `extract`
#    throughput (MB/s of payload read and of image written), next to plain `xz -d` /
#    `bzip2 -d` of the same blobs (examples/payload_blobs.rs dumps them), same run.
# 3. A payload of at least 1 GiB (PAYLOAD_BENCH_BIG_MIB, default 1100, random data, REPLACE):
#    extract and to-cow wall time and peak RSS.
# Needs: cargo, python3, xz, bzip2, /usr/bin/time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:-$(mktemp -d /tmp/payload-bench.XXXXXX)}
mib=${PAYLOAD_BENCH_MIB:-256}
big_mib=${PAYLOAD_BENCH_BIG_MIB:-1100}
mkdir -p "$work"
cd "$work"
cargo build -q --release -p ota-tools --bin ota-tools --example payload_blobs \
    --manifest-path "$repo/Cargo.toml"
bin="$repo/target/release/ota-tools"
blobs="$repo/target/release/examples/payload_blobs"
results="$work/results.md"
: >"$results"
say() { echo "$@" | tee -a "$results"; }

# Run a command under /usr/bin/time; prints "SECONDS MAXRSS_KIB".
timed() {
    /usr/bin/time -f "%e %M" -o "$work/time.txt" "$@" >"$work/cmd.out" 2>"$work/cmd.err" || {
        cat "$work/cmd.err" >&2
        return 1
    }
    cat "$work/time.txt"
}
size() { stat -c %s "$1"; }
mbps() { python3 -c "import sys; b,s=float(sys.argv[1]),float(sys.argv[2]); print(f'{b/1e6/max(s,1e-3):.1f}')" "$1" "$2"; }

say "# payload bench, $(date -u +%Y-%m-%d), $(nproc) cores"
mkdir -p old new
if [[ ! -f new/system.img ]]; then
    python3 "$here/synthetic_pair.py" old/system.img new/system.img "$mib"
fi
img=$(size new/system.img)
say "## synthetic pair, $mib MiB"

read -r t m < <(timed "$bin" payload create --target-dir new --source-dir old --output inc.bin)
say "payload create (incremental, estimate dry run included): ${t} s, peak RSS $((m / 1024)) MiB, payload $(size inc.bin) bytes"
rm -rf ex
read -r t m < <(timed "$bin" payload extract inc.bin --source-dir old --output-dir ex)
cmp ex/system.img new/system.img
say "payload extract: ${t} s, $(mbps "$img" "$t") MB/s of image written, peak RSS $((m / 1024)) MiB"
rm -rf cow
read -r t m < <(timed "$bin" payload to-cow inc.bin --source-dir old --output-dir cow)
say "payload to-cow: ${t} s, COW $(size cow/system.cow) bytes ($(cat cmd.out)), peak RSS $((m / 1024)) MiB"
"$bin" verify --source old/system.img --target new/system.img --cow cow/system.cow >/dev/null
read -r t m < <(timed "$bin" create --source old/system.img --target new/system.img --output create.cow)
say "ota-tools create (same pair, defaults v3 lz4): ${t} s, COW $(size create.cow) bytes, peak RSS $((m / 1024)) MiB"
rm -rf cow2
read -r t m < <(timed "$bin" payload to-cow inc.bin --source-dir old --output-dir cow2 --cow-version 3 --compression lz4)
say "payload to-cow --cow-version 3 --compression lz4: ${t} s, COW $(size cow2/system.cow) bytes"

say "## extract throughput vs plain decompression (full payloads of the target)"
for kind in xz bz; do
    read -r t m < <(timed "$bin" payload create --target-dir new --output "full-$kind.bin" \
        --replace "$kind" --no-estimate)
    pl=$(size "full-$kind.bin")
    rm -rf "ex-$kind"
    read -r t m < <(timed "$bin" payload extract "full-$kind.bin" --output-dir "ex-$kind")
    cmp "ex-$kind/system.img" new/system.img
    say "extract full-$kind ($pl bytes): ${t} s, $(mbps "$pl" "$t") MB/s of payload, $(mbps "$img" "$t") MB/s of image, peak RSS $((m / 1024)) MiB"
    read -r t1 m < <(timed "$bin" payload extract "full-$kind.bin" --output-dir "ex1-$kind" --threads 1)
    say "  same, --threads 1: ${t1} s, $(mbps "$img" "$t1") MB/s of image"
    "$blobs" "full-$kind.bin" . >/dev/null
    if [[ $kind == xz ]]; then
        read -r t m < <(timed sh -c 'xz -d -c blobs.xz >/dev/null')
        say "  plain xz -d of the same blobs ($(size blobs.xz) bytes, one thread): ${t} s, $(mbps "$(size blobs.xz)" "$t") MB/s of input"
    else
        read -r t m < <(timed sh -c 'bzip2 -d -c blobs.bz2 >/dev/null')
        say "  plain bzip2 -d of the same blobs ($(size blobs.bz2) bytes, one thread): ${t} s, $(mbps "$(size blobs.bz2)" "$t") MB/s of input"
    fi
    rm -rf "ex-$kind" "ex1-$kind"
done

say "## peak memory on a payload of at least 1 GiB"
mkdir -p big
if [[ ! -f big/data.img ]]; then
    head -c $((big_mib * 1024 * 1024)) /dev/urandom >big/data.img
fi
read -r t m < <(timed "$bin" payload create --target-dir big --output big.bin --replace none --diff off --no-estimate)
say "payload create (full, REPLACE, $big_mib MiB of random data): ${t} s, peak RSS $((m / 1024)) MiB, payload $(size big.bin) bytes"
rm -rf bigex
read -r t m < <(timed "$bin" payload extract big.bin --output-dir bigex)
cmp bigex/data.img big/data.img
say "payload extract: ${t} s, $(mbps "$(size big.bin)" "$t") MB/s, peak RSS $((m / 1024)) MiB"
rm -rf bigex bigcow
mkdir -p emptyold
read -r t m < <(timed "$bin" payload to-cow big.bin --source-dir emptyold --output-dir bigcow --compression none)
say "payload to-cow (--compression none): ${t} s, COW $(size bigcow/data.cow) bytes, peak RSS $((m / 1024)) MiB"
rm -rf bigcow
say "results: $results"
