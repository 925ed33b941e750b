#!/bin/bash
# Context switches of an idle, serving snapuserd over 10 s (all its threads), on the host.
# Usage: idle_wakeups.sh SNAPUSERD_BINARY COW SOURCE
# The daemon serves a control socket and one handler with 4 workers whose dm-user node is a
# FIFO (no request ever arrives); the sum of voluntary and involuntary context switches of
# every thread, read from /proc/PID/task/*/status, is taken 2 s after `start` and 10 s later.
set -eu
BIN=$1 COW=$2 SRC=$3
D=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; kill $CLIENT 2>/dev/null || true; rm -rf "$D"' EXIT
mkdir "$D/dmu" && mkfifo "$D/dmu/sys"
"$BIN" -socket="$D/ctl" -dm_user_dir="$D/dmu" -worker_count=4 2>"$D/log" &
PID=$!
for _ in $(seq 50); do [ -S "$D/ctl" ] && break; sleep 0.1; done
python3 - "$D/ctl" "$COW" "$SRC" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for m in [f"init,sys,{sys.argv[2]},{sys.argv[3]}".encode(), b"start,sys"]:
    s.send(m)
    print(m.decode(), "->", s.recv(512).decode())
time.sleep(13)
PY
CLIENT=$!
sleep 2
switches() { cat /proc/$PID/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
a=$(switches); threads=$(ls /proc/$PID/task | wc -l); sleep 10; b=$(switches)
echo "$BIN: $threads threads, $((b - a)) context switches in 10 s"
