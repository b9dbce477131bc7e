# What the benchmark harness (run.sh) and the layout list's writer (hot-symbols.sh) share: the
# tools they install, ports, the fast upstream and the requests sent one after another. Sourced
# from the repository's root.

# Tools from the system packages.
install() {
    command -v apt-get >/dev/null || { echo "bench: install $* (no apt-get here)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

# WORK: a scratch directory, removed on exit with every server whose pid is added to PIDS.
work_dir() {
    WORK=$(mktemp -d)
    PIDS=()
    trap cleanup EXIT
}
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench: nothing listens on port $1" >&2
    exit 1
}

nginx_conf() { # name workers server-block
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
daemon off;
worker_processes $2;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1; proxy_temp_path $WORK/$1; fastcgi_temp_path $WORK/$1;
    uwsgi_temp_path $WORK/$1; scgi_temp_path $WORK/$1;
    keepalive_requests 1000000;
    $3
}
EOF
}
# The fast upstream on port $1: nginx answering every request with a small JSON body.
upstream_conf() {
    nginx_conf upstream 1 "server { listen 127.0.0.1:$1; location / { default_type application/json; return 200 '{\"users\":[{\"id\":1,\"name\":\"Ada\"}]}'; } }"
}

# $WORK/proxy.yaml: the proxy on ports $PX and $PXA in front of the upstream on $UP, with a
# budget that never binds (6,000,000 a minute), the contact search's route and any route given
# (one YAML flow mapping an argument).
proxy_conf() {
    cat >"$WORK/proxy.yaml" <<EOF
listen: { data: 127.0.0.1:$PX, admin: 127.0.0.1:$PXA }
upstream: { url: http://127.0.0.1:$UP }
quotas:
  - { name: minute, limit: 6000000, window: 1m }
routes:
  - { name: contact-search, methods: [GET], path: /api/v2/**, on_limit: reject }
EOF
    for route in "$@"; do echo "  - $route" >>"$WORK/proxy.yaml"; done
}

# Requests one after another on one keep-alive connection: `count` contact searches, then
# `writes` ticket creates (none unless given).
sequential() { # port count [writes]
    python3 - "$1" "$2" "${3:-0}" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
body = b'{"ticket":{"subject":"Call from +1 555 0100","comment":{"body":"Logged by the bench"}}}'
sends = [("GET", "/api/v2/users/search.json?query=ada", None)] * int(sys.argv[2])
sends += [("POST", "/api/v2/tickets.json", body)] * int(sys.argv[3])
for method, path, payload in sends:
    c.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"bench: {method} {path}: status {r.status}")
PY
}
