#!/usr/bin/env bash
# The benchmark harness (README, "Benchmarks"): in one run on this machine,
#   1. GET load straight at a fast upstream, through crm-quota-proxy (budgets that never bind;
#      also with data_threads: 0, the shared runtime), and through nginx proxy_pass with an
#      equivalent limit_req: at saturation (wrk, alternating rounds; with the CPU time each
#      server spent per request) and at a fixed 1,000 req/s (loadgen, open loop; the targets
#      alternating second by second, latencies pooled);
#   2. a backlog run: creates at 3x the budget against the simulated CRM (utilization, CRM 429s,
#      how soon a window's first parked write goes), with a sliding and with a fixed local window;
#   3. memory: resident size with 100,000 parked 1 KiB writes;
#   4. scrapes under a backlog: live reads at 1,000 req/s with 100,000 parked writes, alone and
#      while /metrics and /status are scraped every 100 ms;
#   5. the shared ledger: the fixed-rate run through a proxy whose ledger is on Redis (a
#      redis-server of the harness's own), decisions through Redis from 1 and 3 replicas, and
#      the backlog run (sliding) through three replicas sharing that ledger;
#   6. user-space instructions per proxied request, proxy and nginx, each under valgrind's
#      callgrind (a count, not a time: the same whatever else the machine is doing), with the
#      misses of its simulated first-level caches (32 KiB of instructions, 32 KiB of data, as
#      on this machine): how much code and data a request goes through beyond what they hold;
#   7. system calls per proxied request, proxy and nginx, counted by strace (a count too);
#   8. how many of the functions layout/hot-symbols.txt lists the binary has (build.rs lays them
#      out together; bench/hot-symbols.sh writes the list again when the names changed).
# Prints a Markdown report. Everything binds 127.0.0.1 only.
#
#   bench/run.sh            the full run (about 10 minutes; release build)
#   bench/run.sh --smoke    a few seconds of each part, debug build (CI runs this so it cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if ((SMOKE)); then
    PROFILE=debug ROUNDS=1 SAT_SECS=1 RATE=200 RATE_SECS=2 ENTRIES=2000 SCRAPE_ARGS=(2000 200 2 1) LEDGER_SECS=1
    BACKLOG_ARGS=(10 2 1) INSTR_N=50
    # One build for both: the smoke run measures nothing, and the tests built these already.
    build() { cargo build --bin crm-quota-proxy --example loadgen; }
else
    PROFILE=release ROUNDS=3 SAT_SECS=8 RATE=1000 RATE_SECS=10 ENTRIES=100000 SCRAPE_ARGS=(100000 1000 10 3) LEDGER_SECS=10
    BACKLOG_ARGS=(100 10 4) INSTR_N=2000
    # The proxy is built on its own, as it ships: built together with an example, it would get
    # the features the dev-dependencies turn on (tokio's `test-util`, whose timer driver reads
    # the time under a lock, for a clock tests can pause): 2% more instructions per request.
    build() { cargo build --release --example loadgen && cargo build --release --bin crm-quota-proxy; }
fi
# Tools: wrk, nginx, redis-server, valgrind and strace from the system packages.
# shellcheck source=bench/common.sh
source bench/common.sh
command -v wrk >/dev/null || install wrk
command -v nginx >/dev/null || install nginx-light
command -v redis-server >/dev/null || install redis-server
command -v valgrind >/dev/null || install valgrind
command -v strace >/dev/null || install strace
NGINX=$(command -v nginx)

build >&2
BIN=target/$PROFILE/crm-quota-proxy
LOADGEN=target/$PROFILE/examples/loadgen

work_dir

UP=$(free_port) NGX=$(free_port) PX=$(free_port) PXA=$(free_port)
RP=$(free_port) PXR=$(free_port) PXRA=$(free_port) PXS=$(free_port) PXSA=$(free_port)

upstream_conf "$UP"
# nginx as the proxy: the same never-binding budget as the proxy's (6,000,000 per minute).
nginx_conf nginx auto "limit_req_zone \$server_name zone=crm:1m rate=100000r/s;
    upstream crm { server 127.0.0.1:$UP; keepalive 64; }
    server { listen 127.0.0.1:$NGX; location / {
        limit_req zone=crm burst=100000 nodelay; limit_req_status 429;
        proxy_pass http://crm; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
"$NGINX" -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" &
PIDS+=($!)
declare -A SERVER=([direct]=$!)
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" &
PIDS+=($!)
SERVER[nginx]=$!
proxy_conf
RUST_LOG=warn "$BIN" run --config "$WORK/proxy.yaml" 2>"$WORK/proxy.log" &
PIDS+=($!)
SERVER[proxy]=$!
# The same proxy serving its connections on the shared multi-threaded runtime
# (listen.data_threads: 0) instead of a thread per core.
sed -e "s/127.0.0.1:$PX,/127.0.0.1:$PXS,/" -e "s/127.0.0.1:$PXA }/127.0.0.1:$PXSA, data_threads: 0 }/" "$WORK/proxy.yaml" >"$WORK/proxy-shared.yaml"
RUST_LOG=warn "$BIN" run --config "$WORK/proxy-shared.yaml" 2>"$WORK/proxy-shared.log" &
PIDS+=($!)
SERVER[proxy_shared]=$!
# The same proxy with its ledger on Redis (the harness's own, nothing kept on disk).
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)
wait_port "$RP"
sed -e "s/127.0.0.1:$PX,/127.0.0.1:$PXR,/" -e "s/127.0.0.1:$PXA }/127.0.0.1:$PXRA }/" "$WORK/proxy.yaml" >"$WORK/proxy-redis.yaml"
echo "ledger: { store: redis, url: \"redis://127.0.0.1:$RP\", key_prefix: bench, replica_id: bench }" >>"$WORK/proxy-redis.yaml"
RUST_LOG=warn "$BIN" run --config "$WORK/proxy-redis.yaml" 2>"$WORK/proxy-redis.log" &
PIDS+=($!)
wait_port "$UP"; wait_port "$NGX"; wait_port "$PX"; wait_port "$PXR"; wait_port "$PXS"

PATH_Q="/api/v2/users/search.json?query=ada"
declare -A URL=([direct]="http://127.0.0.1:$UP$PATH_Q" [proxy]="http://127.0.0.1:$PX$PATH_Q" [nginx]="http://127.0.0.1:$NGX$PATH_Q" [proxy_redis]="http://127.0.0.1:$PXR$PATH_Q" [proxy_shared]="http://127.0.0.1:$PXS$PATH_Q")
cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("requests=%d errors=%d rps=%.0f p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
EOF

# CPU time a server has spent, user and system apart (in clock ticks): the process and, for
# nginx, its worker processes. Divided by the requests of a saturation run it gives CPU per
# request, a figure the shared machine's noise moves far less than throughput.
cpu_ticks() {
    local user=0 sys=0 pid u s
    for pid in "$1" $(pgrep -P "$1" || true); do
        read -r u s < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
        user=$((user + u)) sys=$((sys + s))
    done
    echo "$user $sys"
}
TICK=$(getconf CLK_TCK)

RESULTS="$WORK/results"
# How much of the request path's layout list (build.rs) this binary has: names the code no longer
# has were skipped by the linker (bench/hot-symbols.sh writes the list again).
listed=$(grep -vc '^#' layout/hot-symbols.txt)
found=$(grep -v '^#' layout/hot-symbols.txt | sort -u | comm -12 - <(nm --defined-only "$BIN" | awk '{ print $3 }' | sort -u) | wc -l)
echo "layout - listed=$listed found=$found profile=$PROFILE" >>"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for target in direct proxy nginx proxy_shared; do
        echo "bench: round $round, $target" >&2
        read -r user0 sys0 < <(cpu_ticks "${SERVER[$target]}")
        line=$(wrk -t1 -c32 -d"${SAT_SECS}s" -s "$WORK/report.lua" "${URL[$target]}" | tail -1)
        read -r user1 sys1 < <(cpu_ticks "${SERVER[$target]}")
        requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
        cpu=$(awk -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$TICK" -v n="$requests" \
            'BEGIN { n = n > 0 ? n : 1; printf "cpu_us=%.2f user_us=%.2f sys_us=%.2f", (u + s) * 1e6 / hz / n, u * 1e6 / hz / n, s * 1e6 / hz / n }')
        echo "saturation $target $line $cpu" >>"$RESULTS"
    done
done
# The fixed rate: the targets take turns second by second, ROUNDS x RATE_SECS seconds each, so
# every one meets the same moments of the shared machine's noise (a burst elsewhere lasting a
# few seconds lands on all of them, not on one target's block); latencies pooled per target.
echo "bench: fixed rate, the targets alternating second by second" >&2
RATE_TARGETS=(direct proxy nginx proxy_shared proxy_redis)
rate_urls=$(for t in "${RATE_TARGETS[@]}"; do printf '%s,' "${URL[$t]}"; done)
mapfile -t lines < <("$LOADGEN" rates "${rate_urls%,}" "$RATE" 1 $((ROUNDS * RATE_SECS)))
((${#lines[@]} == ${#RATE_TARGETS[@]})) || { echo "bench: loadgen rates gave ${#lines[@]} lines" >&2; exit 1; }
for i in "${!RATE_TARGETS[@]}"; do
    echo "rate ${RATE_TARGETS[$i]} ${lines[$i]#url=* }" >>"$RESULTS"
done

echo "bench: backlog runs" >&2
for kind in sliding fixed; do
    echo "backlog $kind $("$LOADGEN" backlog "$BIN" "$kind" "${BACKLOG_ARGS[@]}")" >>"$RESULTS"
done
echo "backlog shared $("$LOADGEN" backlog "$BIN" sliding "${BACKLOG_ARGS[@]}" "redis://127.0.0.1:$RP" 3)" >>"$RESULTS"
echo "bench: memory run" >&2
echo "memory - $("$LOADGEN" memory "$BIN" "$ENTRIES")" >>"$RESULTS"
echo "bench: decisions through the shared ledger" >&2
for n in 1 3; do
    echo "ledger $n $("$LOADGEN" ledger "redis://127.0.0.1:$RP" "$n" "$LEDGER_SECS")" >>"$RESULTS"
done
echo "bench: scrapes under a backlog" >&2
echo "scrape - $("$LOADGEN" scrape "$BIN" "${SCRAPE_ARGS[@]}")" >>"$RESULTS"

# Instructions per proxied request: each target under callgrind, warmed up, its counter zeroed,
# then INSTR_N requests one after another on one keep-alive connection, and the count dumped.
counted() { # name port pid
    sequential "$2" 200
    callgrind_control -z "$3" >/dev/null 2>&1
    sequential "$2" "$INSTR_N"
    callgrind_control -d "$3" >/dev/null 2>&1
    kill "$3"
    wait "$3" 2>/dev/null || true
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw (--cache-sim=yes).
    awk -v name="$1" -v n="$INSTR_N" '/^summary:/ {
        printf "instructions %s per_request=%d i1_misses=%.0f d1_misses=%.0f requests=%d\n",
            name, $2 / n, $5 / n, ($6 + $7) / n, n }' "$WORK/callgrind.$1.1" >>"$RESULTS"
}
echo "bench: instructions per request (callgrind)" >&2
CG=(valgrind --tool=callgrind --cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --callgrind-out-file="$WORK/callgrind.%s")
IPX=$(free_port) IPXA=$(free_port) INGX=$(free_port)
sed -e "s/127.0.0.1:$PX,/127.0.0.1:$IPX,/" -e "s/127.0.0.1:$PXA }/127.0.0.1:$IPXA }/" "$WORK/proxy.yaml" >"$WORK/proxy-counted.yaml"
# shellcheck disable=SC2059
RUST_LOG=warn $(printf "${CG[*]}" proxy) "$BIN" run --config "$WORK/proxy-counted.yaml" 2>"$WORK/proxy-counted.log" &
pid=$!
PIDS+=("$pid")
wait_port "$IPX"
counted proxy "$IPX" "$pid"
# nginx as one process (no master, one worker) so that one count holds all its work.
sed -e "s/worker_processes auto;/worker_processes 1;\nmaster_process off;/" -e "s/127.0.0.1:$NGX;/127.0.0.1:$INGX;/" \
    -e "s|pid $WORK/nginx/nginx.pid|pid $WORK/nginx/counted.pid|" "$WORK/nginx/nginx.conf" >"$WORK/nginx/counted.conf"
# shellcheck disable=SC2059
$(printf "${CG[*]}" nginx) "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/counted.conf" -e "$WORK/nginx/counted.log" 2>"$WORK/nginx-counted.err" &
pid=$!
PIDS+=("$pid")
wait_port "$INGX"
counted nginx "$INGX" "$pid"

# System calls per proxied request: strace attached to every thread of the proxy and of nginx's
# workers, counting while INSTR_N requests go one after another on one keep-alive connection.
traced() { # name pid port
    local pids=() p i tracer
    for p in "$2" $(pgrep -P "$2" || true); do pids+=(-p "$p"); done
    sequential "$3" 200
    : >"$WORK/strace.$1.err"
    strace -f -c -o "$WORK/strace.$1" "${pids[@]}" 2>"$WORK/strace.$1.err" &
    tracer=$!
    # Counting starts once strace has attached to every process (each with all its threads).
    for i in $(seq 1 100); do
        (($(grep -c 'attached' "$WORK/strace.$1.err" || true) >= ${#pids[@]} / 2)) && break
        ((i < 100)) || { echo "bench: strace could not attach to $1 ($(cat "$WORK/strace.$1.err"))" >&2; exit 1; }
        sleep 0.1
    done
    sequential "$3" "$INSTR_N"
    kill -INT "$tracer"
    wait "$tracer" 2>/dev/null || true
    # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v name="$1" -v n="$INSTR_N" '$4 ~ /^[0-9]+$/ && $NF != "total" { calls[$NF] += $4; total += $4 }
        END { line = sprintf("syscalls %s per_request=%.2f requests=%d", name, total / n, n); sep = " top="
              for (c in calls) if (calls[c] / n >= 0.05) { line = line sep c ":" sprintf("%.2f", calls[c] / n); sep = "," }
              print line }' "$WORK/strace.$1" >>"$RESULTS"
}
echo "bench: system calls per request (strace)" >&2
traced proxy "${SERVER[proxy]}" "$PX"
traced nginx "${SERVER[nginx]}" "$NGX"

CORES=$(nproc)
MEM=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
python3 - "$RESULTS" "$ROUNDS" "$RATE" "$CORES" "$MEM" "$SMOKE" <<'EOF'
import datetime, statistics, sys
path, rounds, rate, cores, mem, smoke = sys.argv[1:]
rows = {}
for line in open(path):
    kind, target, *pairs = line.split()
    d = dict(p.split("=", 1) for p in pairs)
    rows.setdefault((kind, target), []).append(d)

def med(kind, target, key):
    return statistics.median(float(r[key]) for r in rows[(kind, target)])

failed = []
print(f"### Benchmark run {datetime.date.today()} ({cores} cores, {mem}; "
      f"`bench/run.sh{' --smoke' if smoke == '1' else ''}`)\n")
for kind, title in (("saturation", f"saturation (wrk, 1 thread, 32 connections; medians of {rounds} alternating rounds)"),
                    ("rate", f"fixed rate, {rate} req/s (open loop; latency from each request's due time; "
                             f"{rows[('rate', 'proxy')][0]['requests']} requests a target, the targets taking "
                             "turns second by second, percentiles of the pooled latencies)")):
    print(f"{title}:\n")
    cpu = kind == "saturation"
    print("| target | req/s | p50 | p99 | p99.9 | errors |" + (" CPU per request |" if cpu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cpu else ""))
    for t in ("direct", "proxy", "nginx", "proxy_shared", "proxy_redis"):
        if (kind, t) not in rows:
            continue
        errors = sum(int(r["errors"]) for r in rows[(kind, t)])
        if errors:
            failed.append(f"{kind} {t}: {errors} errors")
        print(f"| {t} | {med(kind, t, 'rps'):,.0f} | {med(kind, t, 'p50_us') / 1e3:.2f} ms "
              f"| {med(kind, t, 'p99_us') / 1e3:.2f} ms | {med(kind, t, 'p999_us') / 1e3:.2f} ms | {errors} |"
              + (f" {med(kind, t, 'cpu_us'):.1f} µs |" if cpu else ""))
    print()
s = lambda t, k: med("saturation", t, k)
r = lambda t, k: med("rate", t, k)
print(f"- saturation throughput: proxy/direct {s('proxy', 'rps') / s('direct', 'rps'):.2f}, "
      f"proxy/nginx {s('proxy', 'rps') / s('nginx', 'rps'):.2f}")
# Two decimals (a round's CPU time is hundreds of clock ticks): the target compares these two.
print(f"- CPU per request at saturation (the server's processes, user + system): proxy "
      f"{s('proxy', 'cpu_us'):.2f} µs, nginx {s('nginx', 'cpu_us'):.2f} µs, proxy/nginx "
      f"{s('proxy', 'cpu_us') / max(s('nginx', 'cpu_us'), 0.01):.2f}; the proxy on the shared runtime "
      f"(`data_threads: 0`) {s('proxy_shared', 'cpu_us'):.1f} µs and {s('proxy_shared', 'rps'):,.0f} req/s "
      f"(the upstream itself: {s('direct', 'cpu_us'):.1f} µs)")
print(f"- p99 at {rate} req/s: proxy/direct {r('proxy', 'p99_us') / r('direct', 'p99_us'):.2f}, "
      f"proxy/nginx {r('proxy', 'p99_us') / r('nginx', 'p99_us'):.2f}; added by the proxy "
      f"{(r('proxy', 'p99_us') - r('direct', 'p99_us')) / 1e3:.2f} ms, by nginx "
      f"{(r('nginx', 'p99_us') - r('direct', 'p99_us')) / 1e3:.2f} ms; added by the shared ledger "
      f"on Redis (proxy_redis over proxy) {(r('proxy_redis', 'p99_us') - r('proxy', 'p99_us')) / 1e3:.2f} ms; "
      f"p50 added by the proxy {(r('proxy', 'p50_us') - r('direct', 'p50_us')) / 1e3:.3f} ms, by nginx "
      f"{(r('nginx', 'p50_us') - r('direct', 'p50_us')) / 1e3:.3f} ms\n")
print("| decisions through the shared ledger (Redis on loopback) | decisions/s | p50 | p99 | refused |")
print("|---|---|---|---|---|")
for n in ("1", "3"):
    d = rows[("ledger", n)][0]
    if d["refused"] != "0":
        failed.append(f"ledger {n}: {d['refused']} refused")
    print(f"| {n} replica{'s' if n != '1' else ''} | {int(d['per_second']):,} | {int(d['p50_us']) / 1e3:.2f} ms "
          f"| {int(d['p99_us']) / 1e3:.2f} ms | {d['refused']} |")
print()
print("| backlog run | offered | tickets | CRM 429s | whole windows | utilization | first drained call after a window opens (p50 / max) |")
print("|---|---|---|---|---|---|---|")
for k, title in (("sliding", "local window `sliding`"), ("fixed", "local window `fixed`"),
                 ("shared", "3 replicas, one ledger on Redis (`sliding`)")):
    d = rows[("backlog", k)][0]
    if d["drained"] != "true" or d["tickets"] != d["offered"] or d["crm_429"] != "0":
        failed.append(f"backlog {k}: {d}")
    print(f"| {title} | {d['offered']} | {d['tickets']} | {d['crm_429']} | {d['windows']} "
          f"| {float(d['utilization']) * 100:.1f}% | {d['first_call_p50_ms']} / {d['first_call_max_ms']} ms |")
lay = rows[("layout", "-")][0]
print(f"\nrequest path laid out together (layout/hot-symbols.txt, build.rs): "
      + (f"{lay['found']} of the {lay['listed']} listed functions in this binary"
         if lay["profile"] == "release" else "not in a debug build"))
ip, ing = (int(rows[("instructions", t)][0]["per_request"]) for t in ("proxy", "nginx"))
print(f"\ninstructions per proxied request (callgrind, user space, {rows[('instructions', 'proxy')][0]['requests']} "
      f"requests one after another): proxy {ip:,}, nginx {ing:,}, proxy/nginx {ip / max(ing, 1):.2f}")
def misses(t):
    d = rows[("instructions", t)][0]
    return int(d["i1_misses"]), int(d["d1_misses"])
(i1p, d1p), (i1n, d1n) = misses("proxy"), misses("nginx")
print(f"\nfirst-level cache misses per proxied request (the same runs, callgrind's simulated 32 KiB "
      f"caches): instructions proxy {i1p:,}, nginx {i1n:,}; data proxy {d1p:,}, nginx {d1n:,}")
def calls(t):
    d = rows[("syscalls", t)][0]
    top = sorted((kv.split(":") for kv in d.get("top", "").split(",") if kv), key=lambda kv: -float(kv[1]))
    return float(d["per_request"]), ", ".join(f"{c} {float(v):.2f}" for c, v in top)
(sp, sp_top), (sn, sn_top) = calls("proxy"), calls("nginx")
print(f"\nsystem calls per proxied request (strace, {rows[('syscalls', 'proxy')][0]['requests']} requests one after "
      f"another): proxy {sp:.2f} ({sp_top}), nginx {sn:.2f} ({sn_top})")
print(f"\nCPU per request at saturation, user and system apart: proxy {s('proxy', 'user_us'):.1f} + "
      f"{s('proxy', 'sys_us'):.1f} µs, nginx {s('nginx', 'user_us'):.1f} + {s('nginx', 'sys_us'):.1f} µs")
m = rows[("memory", "-")][0]
print(f"\nmemory: {int(m['parked']):,} parked writes of 1 KiB: RSS {m['rss_before_mib']} → {m['rss_after_mib']} MiB, "
      f"{m['bytes_per_entry']} B per write: {m['overhead_beyond_body']} B beyond the body, of which "
      f"{m['request_head_bytes']} B are the request's own line and headers, kept to send it; "
      f"{m['overhead_beyond_request']} B of bookkeeping")
c = rows[("scrape", "-")][0]
if c["errors"] != "0":
    failed.append(f"scrape: {c['errors']} errors")
print(f"\nscrapes under a backlog: {int(c['parked']):,} parked writes, live reads at {c['rate']} req/s "
      f"(medians of {c['rounds']} alternating rounds): p99 {int(c['p99_us_quiet']) / 1e3:.2f} ms alone, "
      f"{int(c['p99_us_scraped']) / 1e3:.2f} ms with /metrics and /status scraped every 100 ms "
      f"({float(c['added_pct']):+.1f}%); a scrape takes {int(c['scrape_p50_us']) / 1e3:.2f} ms "
      f"(p99 {int(c['scrape_p99_us']) / 1e3:.2f} ms)")
if failed:
    print("\nbench: FAILED: " + "; ".join(failed), file=sys.stderr)
    sys.exit(1)
EOF
