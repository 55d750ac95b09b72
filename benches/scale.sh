#!/usr/bin/env bash
# Scale benchmark: portcullis with many consumers and routes (default 100k and 10k).
#
#   benches/scale.sh [--consumers N] [--routes N] [--writes N] [--burst N] [--connections N]
#                    [--format yaml|json] [--via config|admin] [--portcullis PATH] [--keep]
#
# --via config (default): the resources are in the config file, written as --format
# (default yaml). --via admin: they are in the state file, as the Admin API writes
# it, and the config file names only the listeners, the Admin key and that file —
# a replica restarted after its resources came through the Admin API (each Admin
# write then appends to the state file's journal).
#
# Measures, on 127.0.0.1 with free ports:
#   startup   process start → /readyz 200 (config parsed, everything compiled);
#   RSS       VmRSS and VmHWM at ready, 2 s later (settled), and after the writes;
#   writes    for each of --writes Admin API writes (alternately a new route and a
#             consumer update): PUT latency and the time until a Check for the new
#             route is allowed (the write is visible to Checks);
#   burst     then --burst N (default 200) more consumers, each with a jwt-auth
#             credential, created one Admin call after another over one keep-alive
#             connection, as a provisioning script would: writes/s and PUT latency,
#             and the RSS after them;
#   Checks    h2load drives gRPC Check on one route during all the writes: p50/p99,
#             and
#             failures = h2load errors + non-2xx + load Checks portcullis did not
#             allow on the load route: its own portcullis_checks_total{decision=
#             "allow",route=...} must grow by exactly h2load's request count.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONSUMERS=100000
ROUTES=10000
WRITES=20
BURST=200
CONNECTIONS=8
FORMAT=yaml
VIA=config
PORTCULLIS=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --consumers) CONSUMERS=$2; shift 2 ;;
    --routes) ROUTES=$2; shift 2 ;;
    --writes) WRITES=$2; shift 2 ;;
    --burst) BURST=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --format) FORMAT=$2; shift 2 ;;
    --via) VIA=$2; shift 2 ;;
    --portcullis) PORTCULLIS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
. "$ROOT/benches/common.sh"
need_tools scale.sh h2load openssl python3 curl xxd
build_portcullis

make_workdir scale
# The interpreter itself: a pyenv shim costs ~150 ms per call, too much in a timing loop.
PY=$(python3 -c 'import sys; print(sys.executable)')
GRPC_PORT=$(free_port); HTTP_PORT=$(free_port); ADMIN_PORT=$(free_port)
KEY=$(openssl rand -hex 16)

case "$FORMAT" in yaml|json) ;; *) echo "--format: yaml or json, not $FORMAT" >&2; exit 2 ;; esac
case "$VIA" in config|admin) ;; *) echo "--via: config or admin, not $VIA" >&2; exit 2 ;; esac
CONFIG="$WORK/scale.$FORMAT"

# Consumers get a jwt-auth credential each when this build has jwt-auth (probed
# first), so the credential index holds N keys. Ids are distinct, named as APISIX's
# docs name them (cred-<consumer>-jwt-auth).
cat >"$WORK/probe.yaml" <<'EOF'
consumers:
  - username: probe
    credentials: [ { id: c, plugins: { jwt-auth: { key: probe, secret: probe-secret-probe-secret } } } ]
EOF
if "$PORTCULLIS" validate --config "$WORK/probe.yaml" >/dev/null 2>&1; then
  WITH_CREDS=1; CREDS="one jwt-auth credential each"
else
  WITH_CREDS=0; CREDS="no credentials (this build has no jwt-auth)"
fi

# Routes: APISIX-style prefixes; consumers with labels. One resource per line in either
# format (YAML flow mappings as a person would write them, or JSON). Through the
# Admin API: the same resources in the state file portcullis writes (each spec as
# the Admin API keeps it: a route's with its id, a credential's without), every one
# with its own stamp, as that many writes would have left them.
python3 - "$CONFIG" "$CONSUMERS" "$ROUTES" "$GRPC_PORT" "$HTTP_PORT" "$ADMIN_PORT" "$KEY" "$WORK" "$WITH_CREDS" "$FORMAT" "$VIA" <<'EOF'
import json, sys, time
out, consumers, routes, grpc, http, admin, key, work, creds, fmt, via = sys.argv[1:]
def route(i):
    return {"id": f"r{i}", "uri": f"/svc{i}/*", "methods": ["GET", "POST"]}
def consumer(i):
    c = {"username": f"user{i}", "labels": {"team": f"t{i % 97}", "custom_id": f"c{i}"}}
    if creds == "1":
        c["credentials"] = [{"id": f"cred-user{i}-jwt-auth", "plugins": {"jwt-auth": {
            "key": f"key{i}", "secret": f"secret-{i}-0123456789abcdef"}}}]
    return c
def flow(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k}: {flow(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(flow(x) for x in v) + "]"
    return json.dumps(v) if ("/" in v or ":" in v) else v
head = {"listen": {"grpc": f"127.0.0.1:{grpc}", "http": f"127.0.0.1:{http}", "admin": f"127.0.0.1:{admin}"},
        "admin": {"api_key": key}, "state_file": f"{work}/state.json"}
if via == "admin":
    t, index = int(time.time()), 0
    def stamped(spec):
        global index
        index += 1
        return {"spec": spec, "create_time": t, "update_time": t, "created_index": index, "modified_index": index}
    state = {"version": 1, "routes": {}, "consumers": {}, "credentials": {}}
    for i in range(int(routes)):
        state["routes"][f"r{i}"] = stamped(route(i))
    for i in range(int(consumers)):
        c = consumer(i)
        for cred in c.pop("credentials", []):
            state["credentials"][f"{c['username']}/{cred.pop('id')}"] = stamped(cred)
        state["consumers"][c["username"]] = stamped(c)
    state["index"] = index
    with open(head["state_file"], "w") as f:
        json.dump(state, f, indent=2)
    routes = consumers = 0  # the config file below then declares none
with open(out, "w") as f:
    if fmt == "json":
        f.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items()))
        f.write('  "routes": [' + ",".join("\n    " + json.dumps(route(i)) for i in range(int(routes))) + "\n  ],\n")
        f.write('  "consumers": [' + ",".join("\n    " + json.dumps(consumer(i)) for i in range(int(consumers))) + "\n  ]\n}\n")
    else:
        f.write("".join(f"{k}: {flow(v) if isinstance(v, dict) else v}\n" for k, v in head.items()))
        f.write("routes:" + ("".join(f"\n  - {flow(route(i))}" for i in range(int(routes))) or " []") + "\n")
        f.write("consumers:" + ("".join(f"\n  - {flow(consumer(i))}" for i in range(int(consumers))) or " []") + "\n")
EOF

rss() { awk '/^VmRSS|^VmHWM/ { printf "%s %.0f MiB  ", $1, $2 / 1024 }' "/proc/$1/status"; }
now_ms() { date +%s%3N; }

start=$(now_ms)
RUST_LOG=warn "$PORTCULLIS" serve --config "$CONFIG" >"$WORK/portcullis.log" 2>&1 &
PC=$!
PIDS+=("$PC")
until curl -fs -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz"; do
  kill -0 "$PC" 2>/dev/null || { cat "$WORK/portcullis.log" >&2; exit 1; }
  sleep 0.02
done
ready=$(now_ms)
if [ "$VIA" = admin ]; then
  echo "state file (as the Admin API writes it): $ROUTES routes, $CONSUMERS consumers with $CREDS ($(du -h "$WORK/state.json" | cut -f1) of JSON)"
else
  echo "config: $ROUTES routes, $CONSUMERS consumers with $CREDS ($(du -h "$CONFIG" | cut -f1) of ${FORMAT^^})"
fi
echo "startup to ready: $((ready - start)) ms"
echo "memory at ready: $(rss "$PC")"
# The loader's garbage is handed back to the OS just after the snapshot is published
# (src/memory.rs); what a replica keeps is the RSS once that has run.
sleep 2
echo "memory after startup (settled, 2 s after ready): $(rss "$PC")"
# Everything generated was loaded: the last consumer (and its credential) is served.
last="consumers/user$((CONSUMERS - 1))"
[ "$WITH_CREDS" = 1 ] && last="$last/credentials/cred-user$((CONSUMERS - 1))-jwt-auth"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-KEY: $KEY" "http://127.0.0.1:$ADMIN_PORT/apisix/admin/$last")
[ "$code" = 200 ] || { echo "GET /apisix/admin/$last answered $code: not loaded" >&2; exit 1; }

CHECK_URL="http://127.0.0.1:$GRPC_PORT/envoy.service.auth.v3.Authorization/Check"
"$PY" "$ROOT/benches/check_body.py" "$WORK/body.bin" "/svc$((ROUTES / 2))/items/1"
body_for() { "$PY" "$ROOT/benches/check_body.py" "$WORK/probe-$1.bin" "$2"; }
check_allowed() { # body name → 0 if that Check is allowed
  curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$WORK/probe-$1.bin" -o "$WORK/probe.resp" "$CHECK_URL"
  # CheckResponse.status (0a len) .code (08 code): any non-zero code is a denial.
  ! xxd -p -s 5 -l 4 "$WORK/probe.resp" | grep -Eq '^0a..08(0[1-9a-f]|[1-9a-f].)'
}
LOAD_ROUTE="r$((ROUTES / 2))"
allows() { # Checks allowed on the load route (the visibility probes match other routes)
  curl -s "http://127.0.0.1:$HTTP_PORT/metrics" |
    awk -v r="route=\"$LOAD_ROUTE\"" '/^portcullis_checks_total\{/ && /decision="allow"/ && index($0, r) { s += $NF } END { printf "%d\n", s }'
}
body_for load "/svc$((ROUTES / 2))/items/1"
check_allowed load || { echo "the load route is not allowed" >&2; exit 1; }

allows_before=$(allows)
# Fixed-size h2load batches until the writes are done: each batch ends with every
# request answered, so allowed Checks must equal requests sent, exactly.
(
  k=0
  while [ ! -e "$WORK/writes.done" ]; do
    k=$((k + 1))
    h2load -c "$CONNECTIONS" -m 1 -t 1 -n 20000 -d "$WORK/body.bin" \
      -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$WORK/h2-$k.log" \
      "$CHECK_URL" >"$WORK/h2-$k.out" 2>&1
  done
) &
H2=$!
PIDS+=("$H2")
sleep 1.5
: >"$WORK/writes.tsv"
for i in $(seq 1 "$WRITES"); do
  t0=$(now_ms)
  if [ $((i % 2)) = 1 ]; then
    body_for "new$i" "/new$i/x"
    check_allowed "new$i" && { echo "route new$i matched before it was written" >&2; exit 1; }
    t0=$(now_ms)
    code=$(curl -s -o "$WORK/put.out" -w '%{http_code}' -X PUT -H "X-API-KEY: $KEY" \
      -d "{\"uri\":\"/new$i/*\",\"methods\":[\"GET\"]}" "http://127.0.0.1:$ADMIN_PORT/apisix/admin/routes/new$i")
    t1=$(now_ms)
    until check_allowed "new$i"; do sleep 0.005; done
    t2=$(now_ms)
    kind=route
  else
    u=user$(( (i * 7919) % CONSUMERS ))
    code=$(curl -s -o "$WORK/put.out" -w '%{http_code}' -X PUT -H "X-API-KEY: $KEY" \
      -d "{\"username\":\"$u\",\"labels\":{\"team\":\"moved\",\"custom_id\":\"w$i\"}}" "http://127.0.0.1:$ADMIN_PORT/apisix/admin/consumers/$u")
    t1=$(now_ms); t2=$t1
    kind=consumer
  fi
  case "$code" in 200|201) ;; *) echo "write $i ($kind) failed: $code $(cat "$WORK/put.out")" >&2; exit 1 ;; esac
  printf '%s\t%s\t%s\n' "$kind" "$((t1 - t0))" "$((t2 - t0))" >>"$WORK/writes.tsv"
  sleep 0.3
done
touch "$WORK/writes.done"
wait "$H2" || true
allows_after=$(allows)
echo "memory after $WRITES writes: $(rss "$PC")"
python3 - "$WORK/writes.tsv" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1])]
for kind in ("route", "consumer"):
    put = [int(r[1]) for r in rows if r[0] == kind]
    vis = [int(r[2]) for r in rows if r[0] == kind]
    if put:
        print(f"{kind} writes: {len(put)}; Admin PUT ms median {statistics.median(put):.0f} max {max(put)}; "
              f"visible to Checks ms median {statistics.median(vis):.0f} max {max(vis)}")
EOF
# The burst: Checks have stopped; what is timed is the Admin write path alone.
"$PY" - "$ADMIN_PORT" "$KEY" "$BURST" "$WITH_CREDS" <<'EOF'
import http.client, json, statistics, sys, time
port, key, n, creds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
headers = {"X-API-KEY": key, "Content-Type": "application/json"}
lat = []
start = time.monotonic()
for i in range(n):
    writes = [(f"consumers/burst{i}", {"username": f"burst{i}"})]
    if creds:
        writes.append((f"consumers/burst{i}/credentials/cred-burst{i}-jwt-auth",
                       {"plugins": {"jwt-auth": {"key": f"burst-key{i}", "secret": f"secret-b{i}-0123456789abcdef"}}}))
    for path, body in writes:
        t0 = time.monotonic()
        conn.request("PUT", f"/apisix/admin/{path}", json.dumps(body), headers)
        r = conn.getresponse()
        answer = r.read()
        if r.status not in (200, 201):
            sys.exit(f"burst write {path} failed: {r.status} {answer[:200]!r}")
        lat.append((time.monotonic() - t0) * 1000)
took = time.monotonic() - start
if lat:
    print(f"burst: {n} consumers{' with a credential each' if creds else ''}, {len(lat)} Admin PUTs one after another: "
          f"{len(lat) / took:.0f} writes/s, PUT ms median {statistics.median(lat):.1f} max {max(lat):.1f}")
EOF
if [ "$BURST" -gt 0 ]; then echo "memory after the burst: $(rss "$PC")"; fi
cat "$WORK"/h2-*.log | awk '{ print $3 }' | sort -n | awk '{ v[NR] = $1 } END {
  printf "Check latency during writes: %d Checks, p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", NR, v[int(NR*0.5)]/1000, v[int(NR*0.99)]/1000, v[NR]/1000 }'
read -r n_total n_ok n_failed n_errored < <(cat "$WORK"/h2-*.out |
  sed -n 's/^requests: \([0-9]*\) total, .* \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2 \3 \4/p' |
  awk '{ t += $1; o += $2; f += $3; e += $4 } END { print t, o, f, e }')
allowed=$((allows_after - allows_before))
echo "Checks during writes: h2load sent $n_total, 2xx $n_ok, failed $n_failed, errored $n_errored; portcullis allowed $allowed on $LOAD_ROUTE"
if [ "$n_failed" != 0 ] || [ "$n_errored" != 0 ] || [ "$n_ok" != "$n_total" ] || [ "$allowed" != "$n_total" ]; then
  echo "FAILED: some Checks during the writes were not allowed" >&2
  exit 1
fi
echo "no Check failed during the writes"
