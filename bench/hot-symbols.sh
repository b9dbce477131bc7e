#!/usr/bin/env bash
# Writes layout/hot-symbols.txt: the functions of the proxy's binary that proxied requests run
# through, hottest first, which release builds lay out next to one another (build.rs). Run it
# after a change to the request path or to Cargo.lock: a function whose name changed is no longer
# placed (bench/run.sh reports how many of the list the binary has).
#
# The release binary runs under valgrind's callgrind against a fast upstream (nginx); after a
# warm-up, contact searches and ticket creates go one after another on one keep-alive
# connection, and every function of the binary that spent at least one instruction a request
# (callgrind's count of its own instructions) goes in the list, under its linker name.
#
#   bench/hot-symbols.sh    (a few seconds after the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
source bench/common.sh
command -v nginx >/dev/null || install nginx-light
command -v valgrind >/dev/null || install valgrind

cargo build --release --bin crm-quota-proxy >&2
BIN=target/release/crm-quota-proxy
SEARCHES=1000 CREATES=1000
work_dir

UP=$(free_port) PX=$(free_port) PXA=$(free_port)
upstream_conf "$UP"
nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" &
PIDS+=($!)
proxy_conf "{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json }"
wait_port "$UP"
RUST_LOG=warn valgrind --tool=callgrind --demangle=no --callgrind-out-file="$WORK/callgrind" \
    "$BIN" run --config "$WORK/proxy.yaml" 2>"$WORK/proxy.log" &
pid=$!
PIDS+=("$pid")
wait_port "$PX"
sequential "$PX" 200 200
# Two counts: the searches' (reads, which cannot wait), then the creates'.
callgrind_control -z "$pid" >/dev/null 2>&1
sequential "$PX" "$SEARCHES"
callgrind_control -d "$pid" >/dev/null 2>&1
sequential "$PX" 0 "$CREATES"
callgrind_control -d "$pid" >/dev/null 2>&1
kill "$pid"
wait "$pid" 2>/dev/null || true

# callgrind's file: `ob=`/`fn=` name the object and function (a name given once, then by its
# number in parentheses); cost lines start with a position and then the instruction count; the
# line after `calls=` is a call's inclusive cost, not the caller's own.
python3 - "$(basename "$BIN")" "$WORK/callgrind.1" "$SEARCHES" "$WORK/callgrind.2" "$CREATES" >layout/hot-symbols.txt <<'PY'
import re, sys
binary = sys.argv[1]
def hot(path, requests):
    """The binary's functions with at least one instruction of their own a request, hottest first."""
    names = {"ob": {}, "fn": {}}  # the file's compressed names: number -> name
    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), "")
    own, ob, fn, skip = {}, "", "", False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if skip:
            skip = False
        elif line.startswith(("ob=", "fn=")):
            value = name(line[:2], line[3:])
            if line[:2] == "ob":
                ob = value
            else:
                fn = value
        elif line.startswith(("cob=", "cfn=")):
            name(line[1:3], line[4:])
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            if len(fields) >= 2 and fn and ob.endswith("/" + binary):
                own[fn] = own.get(fn, 0) + int(fields[1])
    found = sorted((f for f, n in own.items() if n >= requests), key=lambda f: -own[f])
    if len(found) < 50:
        sys.exit(f"bench: only {len(found)} functions found in {path}")
    return found
searches = hot(sys.argv[2], int(sys.argv[3]))
seen = set(searches)
creates = [f for f in hot(sys.argv[4], int(sys.argv[5])) if f not in seen]
print("# The proxy's request path: release builds place these functions together (build.rs).")
print("# Written by bench/hot-symbols.sh under callgrind: the functions contact searches run")
print("# through, hottest first, then those only ticket creates add. Regenerate after changing")
print("# that path.")
print("\n".join(searches + creates))
PY
echo "bench: layout/hot-symbols.txt: $(grep -vc '^#' layout/hot-symbols.txt) functions" >&2
