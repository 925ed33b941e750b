#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Style and static checks for kernel/ (dm-user):
#   - checkpatch.pl --strict on every .c/.h file (no errors, warnings or checks)
#   - kernel-doc -Wall on the same files (no output)
#   - W=1 C=1 (sparse) module builds against Debian's 6.1 and 6.12
#     cloud-amd64 kernel headers (no "warning:" and no sparse output)
#
# Runs on a fresh Debian 12 machine as root: installs what it needs with
# apt-get and resolves the kernel ABI versions at run time.  checkpatch.pl
# and its data files come from the newest linux-source-* package, extracted
# into build/kernel-style/ (gitignored).  Exits non-zero on any finding.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)		# kernel/
repo=$(cd "$here/.." && pwd)
cache="$repo/build/kernel-style"
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
log() { printf '%s\n' "check-style: $*" >&2; }

newest() {	# newest package name matching an apt-cache regex
	apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -1
}

need_pkgs=()
command -v sparse >/dev/null || need_pkgs+=(sparse)
command -v perl >/dev/null || need_pkgs+=(perl)
command -v make >/dev/null || need_pkgs+=(make)
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v xz >/dev/null || need_pkgs+=(xz-utils)

if [ "${CHECK_STYLE_NO_UPDATE:-0}" != 1 ]; then
	apt_get update -qq >&2 || log "apt-get update failed; using cached lists"
fi

src_pkg=$(newest '^linux-source-[0-9.]+$')
h61=$(newest '^linux-headers-6\.1\.0-[0-9]+-cloud-amd64$')
h612=$(newest '^linux-headers-6\.12\.[0-9]+\+deb12-cloud-amd64$')
for p in "$src_pkg" "$h61" "$h612"; do
	[ -n "$p" ] || { log "cannot resolve a package (source: '$src_pkg', 6.1: '$h61', 6.12: '$h612')"; exit 2; }
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
		need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
	log "installing ${need_pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive apt_get install -y -q "${need_pkgs[@]}" >&2
fi

# checkpatch.pl, spelling.txt and const_structs.checkpatch from the tarball.
ver=${src_pkg#linux-source-}
tarball=/usr/src/linux-source-$ver.tar.xz
cp_dir="$cache/linux-source-$ver"
if [ ! -f "$cp_dir/scripts/checkpatch.pl" ] || [ ! -f "$cp_dir/scripts/kernel-doc" ]; then
	log "extracting checkpatch.pl from $tarball"
	mkdir -p "$cache"
	tar -xJf "$tarball" -C "$cache" \
		"linux-source-$ver/scripts/checkpatch.pl" \
		"linux-source-$ver/scripts/spelling.txt" \
		"linux-source-$ver/scripts/const_structs.checkpatch" \
		"linux-source-$ver/scripts/kernel-doc"
fi

fail=0
mapfile -t files < <(cd "$here" && find . -name '*.[ch]' | sed 's|^\./||' | sort)
log "checkpatch --strict on ${#files[@]} files"
if ! (cd "$here" && perl "$cp_dir/scripts/checkpatch.pl" --strict --no-tree \
	--quiet --show-types -f "${files[@]}"); then
	log "FAIL: checkpatch"
	fail=1
else
	log "ok: checkpatch clean"
fi

log "kernel-doc -Wall on ${#files[@]} files"
kdoc_out=$(cd "$here" && perl "$cp_dir/scripts/kernel-doc" -none -Wall "${files[@]}" 2>&1) || true
if [ -n "$kdoc_out" ]; then
	printf '%s\n' "$kdoc_out" >&2
	log "FAIL: kernel-doc"
	fail=1
else
	log "ok: kernel-doc clean"
fi

for pkg in "$h61" "$h612"; do
	abi=${pkg#linux-headers-}
	kdir=/usr/src/linux-headers-$abi
	[ -f "$kdir/Makefile" ] || kdir=/lib/modules/$abi/build
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	cp -r "$here/Makefile" "$here/Kconfig" "$here/dm-user.c" "$here/include" "$work/"
	log "building against $abi (W=1 C=1)"
	out="$work/build.log"
	if ! make -C "$kdir" M="$work" W=1 C=1 modules >"$out" 2>&1; then
		cat "$out" >&2
		log "FAIL: build against $abi"
		fail=1
	elif grep -vE '^(make(\[[0-9]+\])?: (Entering|Leaving) directory|  (CC|CHECK|MODPOST|LD|BTF) |Skipping BTF generation)' "$out" | grep -q .; then
		# Anything besides the normal progress lines: a compiler
		# warning, a sparse complaint or a note.
		grep -vE '^(make(\[[0-9]+\])?: (Entering|Leaving) directory|  (CC|CHECK|MODPOST|LD|BTF) |Skipping BTF generation)' "$out" >&2
		log "FAIL: diagnostics building against $abi"
		fail=1
	elif [ ! -f "$work/dm-user.ko" ]; then
		log "FAIL: no dm-user.ko for $abi"
		fail=1
	else
		log "ok: $abi builds clean with W=1 C=1"
	fi
	rm -rf "$work"
	trap - EXIT
done

if [ $fail -ne 0 ]; then
	log "FAILED"
	exit 1
fi
log "all checks passed"
