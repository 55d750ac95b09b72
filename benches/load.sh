#!/usr/bin/env bash
# Load benchmark: Envoy with and without ext_authz (portcullis), next to Envoy's own
# in-process jwt_authn, and portcullis's gRPC Check on its own — in one run, on one
# machine, so the ratios are comparable. See docs/benchmarks.md.
#
#   benches/load.sh [--runs N] [--duration SECONDS] [--connections N] [--threads N]
#                   [--concurrency N] [--portcullis PATH] [--smoke] [--keep]
#
# Starts, all on 127.0.0.1 with free ports: Debian's nginx (the upstream, a small
# body; also the JWKS/discovery documents and the forward-auth service), portcullis
# (release build unless --portcullis is given), and Envoy 1.40 running the shipped
# envoy/envoy.yaml as four listeners that differ only in their auth filter: none,
# Envoy's native jwt_authn (HS256, inline local JWKS), ext_authz calling portcullis, and
# ext_authz calling nginx, which answers every Check with one stored OK CheckResponse
# (a real server that decides nothing: what the ext_authz hop itself costs);
# and, for the session-cookie row, the tests' real OpenID Provider
# (node tests/oidc/provider.mjs after `npm ci --prefix tests/oidc`; skipped without it).
# wrk drives the listeners; h2load drives portcullis's gRPC Check
# directly (content-type application/grpc, te: trailers, a length-prefixed
# CheckRequest), with one stream per connection as wrk does, and for the no-plugin and
# HS256 routes also as Envoy does: one connection per Envoy worker (--concurrency),
# the connections' requests as concurrent streams on it. Rows run interleaved (row
# 1..k, then again) and the table quotes the median of --runs runs for req/s, p50,
# p99 and the CPU time per request that Envoy,
# portcullis and nginx spent (user + system, from /proc; wrk/h2load not counted), so a
# ratio can be traced to the process that spent the time; each ratio line also gives
# every run's own ratio. Rows whose plugin this portcullis
# build does not support are skipped with a note. Exits non-zero if any row that ran
# produced no numbers or any non-2xx answer.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3
DURATION=10
CONNECTIONS=32
THREADS=1
CONCURRENCY=$(nproc)
PORTCULLIS=""
KEEP=0
SMOKE=0

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --portcullis) PORTCULLIS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
if [ "$SMOKE" = 1 ]; then RUNS=1; DURATION=2; CONNECTIONS=4; fi

. "$ROOT/benches/common.sh"
need_tools load.sh envoy wrk h2load openssl python3 curl xxd
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "load.sh needs nginx (Debian package nginx)" >&2; exit 1; }

build_portcullis

make_workdir load
# nginx workers drop to an unprivileged user when started as root: they must be able to
# read the OIDC documents served from here (mktemp -d makes the directory 0700).
chmod 755 "$WORK"

wait_http() { # url, what
  local i
  for i in $(seq 1 200); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.05
  done
  echo "$2 did not come up ($1); logs in $WORK" >&2
  [ "$KEEP" = 1 ] || tail -n 20 "$WORK"/*.log >&2 || true
  exit 1
}

UP_PORT=$(free_port); AUTH_PORT=$(free_port); GRPC_PORT=$(free_port); HTTP_PORT=$(free_port)
ADMIN_PORT=$(free_port); ENVOY_ADMIN=$(free_port)
PLAIN_PORT=$(free_port); JWTN_PORT=$(free_port); AUTHZ_PORT=$(free_port)
CANNED_GRPC_PORT=$(free_port); CANNED_PORT=$(free_port)
ISSUER="http://127.0.0.1:$UP_PORT"

# --- keys and tokens (openssl; nothing random is reused across runs) -------------
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
HS_SECRET=$(openssl rand -hex 24)
openssl genrsa -out "$WORK/rs.pem" 2048 2>/dev/null
openssl rsa -in "$WORK/rs.pem" -pubout -out "$WORK/rs.pub.pem" 2>/dev/null
RS_N=$(openssl rsa -in "$WORK/rs.pem" -noout -modulus 2>/dev/null | cut -d= -f2 | xxd -r -p | b64url)
EXP=4102444800 # 2100-01-01
jwt() { # alg, payload-json, [kid]
  local header signing sig
  if [ -n "${3:-}" ]; then header="{\"alg\":\"$1\",\"typ\":\"JWT\",\"kid\":\"$3\"}"
  else header="{\"alg\":\"$1\",\"typ\":\"JWT\"}"; fi
  signing="$(printf '%s' "$header" | b64url).$(printf '%s' "$2" | b64url)"
  case "$1" in
    HS256) sig=$(printf '%s' "$signing" | openssl dgst -sha256 -hmac "$HS_SECRET" -binary | b64url) ;;
    RS256) sig=$(printf '%s' "$signing" | openssl dgst -sha256 -sign "$WORK/rs.pem" -binary | b64url) ;;
  esac
  printf '%s.%s' "$signing" "$sig"
}
HS_TOKEN=$(jwt HS256 "{\"key\":\"bench-hs\",\"iss\":\"bench\",\"sub\":\"bench\",\"exp\":$EXP}")
RS_TOKEN=$(jwt RS256 "{\"key\":\"bench-rs\",\"iss\":\"$ISSUER\",\"aud\":\"bench\",\"sub\":\"bench\",\"exp\":$EXP}" bench-rs)
HS_JWKS="{\"keys\":[{\"kty\":\"oct\",\"alg\":\"HS256\",\"k\":\"$(printf '%s' "$HS_SECRET" | b64url)\"}]}"

# --- nginx: upstream, OIDC documents, forward-auth service, canned Check answer ----
mkdir -p "$WORK/www/.well-known" "$WORK/nginx-tmp" "$WORK/canned/envoy.service.auth.v3.Authorization"
# A gRPC message of zero bytes: an empty CheckResponse, whose status means OK.
printf '\0\0\0\0\0' >"$WORK/canned/envoy.service.auth.v3.Authorization/Check"
printf '{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"bench-rs","n":"%s","e":"AQAB"}]}\n' "$RS_N" >"$WORK/www/jwks.json"
cat >"$WORK/www/.well-known/openid-configuration" <<EOF
{"issuer":"$ISSUER","authorization_endpoint":"$ISSUER/authorize","token_endpoint":"$ISSUER/token",
 "jwks_uri":"$ISSUER/jwks.json","introspection_endpoint":"$ISSUER/introspect",
 "response_types_supported":["code"],"subject_types_supported":["public"],
 "id_token_signing_alg_values_supported":["RS256"]}
EOF
cat >"$WORK/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-tmp/body;
  proxy_temp_path $WORK/nginx-tmp/proxy;
  fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
  scgi_temp_path $WORK/nginx-tmp/scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP_PORT;
    location = /jwks.json { root $WORK/www; default_type application/json; }
    location = /.well-known/openid-configuration { root $WORK/www; default_type application/json; }
    # RFC 7662: every opaque token is active until EXP (portcullis caches the answer).
    location = /introspect {
      default_type application/json;
      return 200 '{"active":true,"sub":"bench","scope":"openid","client_id":"bench","iss":"$ISSUER","exp":$EXP}';
    }
    location / { default_type text/plain; return 200 "hello from upstream\n"; }
  }
  server {
    listen 127.0.0.1:$AUTH_PORT;
    location / { add_header X-User-Id bench always; return 200; }
  }
  # The canned ext_authz server: gRPC over cleartext HTTP/2, every Check answered
  # with the stored empty CheckResponse and grpc-status 0, whatever it asks.
  server {
    listen 127.0.0.1:$CANNED_GRPC_PORT http2;
    server_tokens off;
    etag off;
    open_file_cache max=16;
    location = /envoy.service.auth.v3.Authorization/Check {
      root $WORK/canned;
      default_type application/grpc;
      add_trailer grpc-status 0 always;
      add_header Last-Modified "";
      max_ranges 0;
      # nginx's static files refuse POST (405); error_page answers with the file.
      error_page 405 =200 \$uri;
    }
  }
}
EOF
"$NGINX" -e "$WORK/nginx.log" -p "$WORK" -c "$WORK/nginx.conf" &
PIDS+=($!)
NGINX_PID=$!

# --- OpenID Provider for the session-cookie row: the tests' real oidc-provider ------
# (node tests/oidc/provider.mjs; `npm ci --prefix tests/oidc` installs it). Without it
# that row is skipped with a note, like a plugin this build lacks.
OP_ISSUER=""
SESSION_CALLBACK="http://127.0.0.1:$AUTHZ_PORT/oidc-session/callback"
if command -v node >/dev/null && [ -d "$ROOT/tests/oidc/node_modules/oidc-provider" ]; then
  node "$ROOT/tests/oidc/provider.mjs" \
    "{\"clients\":[{\"client_id\":\"bench-rp\",\"client_secret\":\"bench-rp-secret\",\"redirect_uris\":[\"$SESSION_CALLBACK\"]}]}" \
    >"$WORK/op.out" 2>"$WORK/op.log" &
  PIDS+=($!)
  for _ in $(seq 1 600); do
    OP_ISSUER=$(sed -n 's/.*"issuer":"\([^"]*\)".*/\1/p' "$WORK/op.out")
    [ -n "$OP_ISSUER" ] && break
    sleep 0.1
  done
  [ -n "$OP_ISSUER" ] || { echo "the OpenID Provider did not start; logs in $WORK" >&2; KEEP=1; exit 1; }
fi
SESSION_SECRET=$(openssl rand -hex 24)

# --- portcullis: one route per row; plugin routes only if this build has them ---
bearer_route() { # id [extra openid-connect setting] → a bearer_only route at /ID/*
  cat <<EOF
  - id: $1
    uri: "/$1/*"
    plugins:
      openid-connect:
        client_id: bench
        client_secret: bench-secret
        discovery: $ISSUER/.well-known/openid-configuration
        bearer_only: true
EOF
  if [ -n "${2:-}" ]; then echo "        $2"; fi
}
route_yaml() { # row id → route (and consumer) YAML lines, empty if none
  case "$1" in
    noplugin) echo '  - { id: open, uri: "/open/*" }' ;;
    jwt-hs) echo '  - { id: jwt-hs, uri: "/jwt-hs/*", plugins: { jwt-auth: {} } }' ;;
    jwt-rs) echo '  - { id: jwt-rs, uri: "/jwt-rs/*", plugins: { jwt-auth: {} } }' ;;
    oidc) bearer_route oidc "use_jwks: true" ;; # JWTs verified with the JWKS
    oidc-intro) bearer_route oidc-intro ;;       # opaque tokens, RFC 7662 introspection
    oidc-session) [ -n "$OP_ISSUER" ] && cat <<EOF
  - id: oidc-session
    uri: "/oidc-session/*"
    plugins:
      openid-connect:
        client_id: bench-rp
        client_secret: bench-rp-secret
        discovery: $OP_ISSUER/.well-known/openid-configuration
        redirect_uri: $SESSION_CALLBACK
        scope: openid
        session: { secret: $SESSION_SECRET }
EOF
    ;;
    fwd) cat <<EOF
  - id: fwd
    uri: "/fwd/*"
    plugins:
      forward-auth:
        uri: http://127.0.0.1:$AUTH_PORT/auth
        request_headers: [authorization]
        upstream_headers: [x-user-id]
EOF
    ;;
    fwd-cache) cat <<EOF
  - id: fwd-cache
    uri: "/fwd-cache/*"
    plugins:
      forward-auth:
        uri: http://127.0.0.1:$AUTH_PORT/auth
        request_headers: [authorization]
        upstream_headers: [x-user-id]
        portcullis: { cache: { key_headers: [authorization], ttl: 60 } }
EOF
    ;;
  esac
}
consumers_yaml() {
  cat <<EOF
consumers:
  - username: bench_hs
    credentials:
      - { id: hs, plugins: { jwt-auth: { key: bench-hs, secret: "$HS_SECRET", algorithm: HS256 } } }
  - username: bench_rs
    credentials:
      - id: rs
        plugins:
          jwt-auth:
            key: bench-rs
            algorithm: RS256
            public_key: |
$(sed 's/^/              /' "$WORK/rs.pub.pem")
EOF
}
header_yaml() {
  cat <<EOF
listen: { grpc: "127.0.0.1:$GRPC_PORT", http: "127.0.0.1:$HTTP_PORT", admin: "127.0.0.1:$ADMIN_PORT" }
state_file: $WORK/state.yaml
EOF
}
NEEDS_CONSUMERS="jwt-hs jwt-rs"
PC_ROWS=(noplugin jwt-hs jwt-rs oidc oidc-intro oidc-session fwd fwd-cache)
declare -A SKIP=()
ENABLED=()
for r in "${PC_ROWS[@]}"; do
  {
    header_yaml
    echo "routes:"
    route_yaml "$r"
    case " $NEEDS_CONSUMERS " in *" $r "*) consumers_yaml ;; esac
  } >"$WORK/probe-$r.yaml"
  if [ "$r" = oidc-session ] && [ -z "$OP_ISSUER" ]; then
    SKIP[$r]="needs node and the test OpenID Provider (npm ci --prefix tests/oidc)"
  elif out=$("$PORTCULLIS" validate --config "$WORK/probe-$r.yaml" 2>&1); then
    ENABLED+=("$r")
  else
    SKIP[$r]=$(printf '%s' "$out" | tr '\n' ' ' | sed 's/.*err: //' | cut -c1-120)
  fi
done
{
  header_yaml
  echo "routes:"
  for r in "${ENABLED[@]}"; do route_yaml "$r"; done
  for r in "${ENABLED[@]}"; do
    case " $NEEDS_CONSUMERS " in *" $r "*) consumers_yaml; break ;; esac
  done
} >"$WORK/portcullis.yaml"
RUST_LOG=warn "$PORTCULLIS" serve --config "$WORK/portcullis.yaml" >"$WORK/portcullis.log" 2>&1 &
PIDS+=($!)
PORTCULLIS_PID=$!

# --- Envoy: the shipped envoy/envoy.yaml, as four listeners -----------------------
python3 "$ROOT/benches/envoy_config.py" "$ROOT/envoy/envoy.yaml" "$WORK/envoy.yaml" \
  "$ENVOY_ADMIN" "$UP_PORT" "$GRPC_PORT" "$PLAIN_PORT" "$JWTN_PORT" "$AUTHZ_PORT" "$HS_JWKS" \
  "$CANNED_GRPC_PORT" "$CANNED_PORT"
envoy -c "$WORK/envoy.yaml" --concurrency "$CONCURRENCY" --base-id "$((ENVOY_ADMIN % 60000))" \
  -l warn >"$WORK/envoy.log" 2>&1 &
PIDS+=($!)
ENVOY_PID=$!

wait_http "http://127.0.0.1:$UP_PORT/" nginx
wait_http "http://127.0.0.1:$HTTP_PORT/readyz" portcullis
wait_http "http://127.0.0.1:$ENVOY_ADMIN/ready" Envoy

# --- rows ----------------------------------------------------------------------
# A real login at the OP through Envoy; every request of the session rows then carries
# the session cookie it set (decrypted and checked by portcullis each time).
SESSION_COOKIE=""
session_login() {
  SESSION_COOKIE=$(python3 "$ROOT/benches/oidc_login.py" \
    "http://127.0.0.1:$AUTHZ_PORT/oidc-session/item" "$OP_ISSUER" bench) ||
    { echo "the login for the session row failed; logs in $WORK" >&2; KEEP=1; exit 1; }
}
case " ${ENABLED[*]} " in *" oidc-session "*) session_login ;; esac

# id | tool | target | header | baseline | label
ROWS=()
add() { ROWS+=("$1|$2|$3|$4|$5|$6"); }
label_of() {
  case "$1" in
    noplugin) echo "no-plugin route" ;; jwt-hs) echo "jwt-auth HS256" ;; jwt-rs) echo "jwt-auth RS256" ;;
    oidc) echo "openid-connect bearer (JWKS)" ;; oidc-intro) echo "openid-connect bearer (introspection cache)" ;;
    oidc-session) echo "openid-connect session cookie" ;; fwd) echo "forward-auth" ;; fwd-cache) echo "forward-auth + decision cache" ;;
  esac
}
auth_of() {
  case "$1" in
    jwt-hs) echo "authorization: Bearer $HS_TOKEN" ;; jwt-rs|oidc) echo "authorization: Bearer $RS_TOKEN" ;;
    fwd|fwd-cache|oidc-intro) echo "authorization: Bearer opaque-bench-token" ;;
    oidc-session) echo "cookie: $SESSION_COOKIE" ;; *) echo "" ;;
  esac
}
path_of() { case "$1" in noplugin) echo /open/item ;; *) echo "/$1/item" ;; esac; }
add envoy wrk "http://127.0.0.1:$PLAIN_PORT/open/item" "" envoy "Envoy, no auth"
add jwtn wrk "http://127.0.0.1:$JWTN_PORT/open/item" "authorization: Bearer $HS_TOKEN" envoy "Envoy jwt_authn HS256 (in-process)"
# What the ext_authz hop costs by itself: the same request and token as the jwt_authn
# row, through the shipped ext_authz filter, answered by a mature HTTP/2 server that
# decides nothing and only sends back a stored OK. A server that does real work and
# still matches this row is at the limit of the architecture, not of its own code.
add canned wrk "http://127.0.0.1:$CANNED_PORT/open/item" "authorization: Bearer $HS_TOKEN" envoy \
  "Envoy + canned ext_authz answer (nginx), with the token"
for r in "${ENABLED[@]}"; do
  base=pc-noplugin; [ "$r" = noplugin ] && base=envoy
  add "pc-$r" wrk "http://127.0.0.1:$AUTHZ_PORT$(path_of "$r")" "$(auth_of "$r")" "$base" "Envoy + portcullis: $(label_of "$r")"
  # The same no-plugin route, carrying the HS256 token: what Envoy alone spends on a
  # request with a token (a bigger CheckRequest and upstream request), so the HS256
  # row can also be read against a baseline that differs only in portcullis's work.
  if [ "$r" = noplugin ]; then
    add pc-noplugin-hdr wrk "http://127.0.0.1:$AUTHZ_PORT/open/item" "authorization: Bearer $HS_TOKEN" pc-noplugin \
      "Envoy + portcullis: no-plugin route, with the token"
  fi
done
for r in "${ENABLED[@]}"; do
  hdr=$(auth_of "$r")
  python3 "$ROOT/benches/check_body.py" "$WORK/body-$r.bin" "$(path_of "$r")" ${hdr:+"$hdr"}
  base=grpc-noplugin
  add "grpc-$r" h2load "$WORK/body-$r.bin" "" "$base" "gRPC Check direct: $(label_of "$r")"
done
# What portcullis gets from Envoy: one HTTP/2 connection per Envoy worker, carrying
# that worker's share of the concurrent requests as streams. The same Checks, in that
# shape: fewer system calls per Check on both sides than one stream per connection.
MUX_CONNECTIONS=$CONCURRENCY
MUX_STREAMS=$(( (CONNECTIONS + CONCURRENCY - 1) / CONCURRENCY ))
for r in noplugin jwt-hs; do
  case " ${ENABLED[*]} " in *" $r "*) ;; *) continue ;; esac
  add "mux-$r" h2load-mux "$WORK/body-$r.bin" "" mux-noplugin \
    "gRPC Check direct, $MUX_CONNECTIONS × $MUX_STREAMS streams: $(label_of "$r")"
done
CHECK_URL="http://127.0.0.1:$GRPC_PORT/envoy.service.auth.v3.Authorization/Check"

# One request per row before measuring: every row must be an allow, else its
# numbers would measure a denial.
for row in "${ROWS[@]}"; do
  IFS='|' read -r id tool target header _ label <<<"$row"
  if [ "$tool" = wrk ]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' ${header:+-H "$header"} "$target")
    [ "$code" = 200 ] || { echo "sanity: $label answered $code, expected 200 (logs in $WORK)" >&2; KEEP=1; exit 1; }
  else
    curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
      --data-binary "@$target" -o "$WORK/resp.bin" -D "$WORK/resp.h" "$CHECK_URL"
    python3 - "$WORK/resp.bin" "$WORK/resp.h" "$label" <<'EOF' || { KEEP=1; exit 1; }
import sys
body = open(sys.argv[1], "rb").read()[5:]
heads = open(sys.argv[2]).read().lower()
if "grpc-status: 0" not in heads:
    sys.exit(f"sanity: {sys.argv[3]}: gRPC call failed: {heads!r}")
# CheckResponse.status (1) → google.rpc.Status.code (1); absent means OK (0).
code = 0
if body[:1] == b"\x0a" and len(body) > 3 and body[2] == 0x08:
    code = body[3]
if code != 0:
    sys.exit(f"sanity: {sys.argv[3]}: Check denied with code {code}")
EOF
  fi
done

to_ms() { # wrk latency like 812.00us / 1.23ms / 1.02s → ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n *= 1; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}
# CPU time (clock ticks, user + system) of a process and its children that are still
# running: Envoy, portcullis, nginx with its workers.
ticks() {
  local pid total=0 t
  for pid in "$1" $(pgrep -P "$1" 2>/dev/null); do
    t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || continue
    total=$((total + ${t:-0}))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
# h2load_ok ID OUTPUT: true when h2load answered every request with a 2xx; else says why.
h2load_ok() {
  local fail ok
  fail=$(sed -n 's/^requests: .* \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2/p' <<<"$2")
  ok=$(awk '/^status codes:/ { gsub(",", ""); print $3 }' <<<"$2")
  if [ "$fail" != "0 0" ] || [ "${ok:-0}" = 0 ]; then
    echo "$1: h2load reported failures: $(grep -E '^(requests|status codes):' <<<"$2" | tr '\n' ' ')" >&2
    return 1
  fi
}

# cpu_per_req BEFORE AFTER REQUESTS → µs of CPU per request for each of envoy,
# portcullis, nginx. Where a ratio comes from: which process spent the time.
cpu_per_req() {
  awk -v b="$1" -v a="$2" -v n="$3" -v hz="$HZ" 'BEGIN {
    split(b, x, " "); split(a, y, " ")
    for (i = 1; i <= 3; i++) printf "%s%.1f", (i > 1 ? " " : ""), (n > 0 ? (y[i] - x[i]) * 1e6 / hz / n : 0) }'
}
run_row() { # id tool target header → "rps p50 p99 envoy_us portcullis_us nginx_us" in $WORK/res-ID
  local id=$1 tool=$2 target=$3 header=$4 out before after
  before="$(ticks "$ENVOY_PID") $(ticks "$PORTCULLIS_PID") $(ticks "$NGINX_PID")"
  if [ "$tool" = wrk ]; then
    out=$(wrk -t "$THREADS" -c "$CONNECTIONS" -d "${DURATION}s" --latency ${header:+-H "$header"} "$target")
    if grep -q -E 'Non-2xx|Socket errors' <<<"$out"; then
      echo "$id: errors during load:" >&2; grep -E 'Non-2xx|Socket errors' <<<"$out" >&2; echo "fail" >>"$WORK/res-$id"; return
    fi
    local rps p50 p99 n
    after="$(ticks "$ENVOY_PID") $(ticks "$PORTCULLIS_PID") $(ticks "$NGINX_PID")"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    n=$(awk '/ requests in / { print $1 }' <<<"$out")
    echo "$rps $p50 $p99 $(cpu_per_req "$before" "$after" "$n")" >>"$WORK/res-$id"
  else
    rm -f "$WORK/h2.log"
    local shape=(-c "$CONNECTIONS" -m 1)
    [ "$tool" = h2load-mux ] && shape=(-c "$MUX_CONNECTIONS" -m "$MUX_STREAMS")
    # The Check both passes send: a length-prefixed CheckRequest as gRPC.
    local check=(-d "$target" -H 'content-type: application/grpc' -H 'te: trailers' "$CHECK_URL")
    out=$(h2load "${shape[@]}" -t "$THREADS" -D "$DURATION" --warm-up-time=1 "${check[@]}" 2>&1)
    local rps
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
    h2load_ok "$id" "$out" || { echo "fail" >>"$WORK/res-$id"; return; }
    after="$(ticks "$ENVOY_PID") $(ticks "$PORTCULLIS_PID") $(ticks "$NGINX_PID")"
    # Requests answered while CPU was counted, the 1 s warm-up included.
    local n
    n=$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { printf "%d", r * (d + 1) }')
    # Latency from a second pass of about a second's requests in the same shape:
    # h2load's per-request log costs it a write(2) per request, which on cores it
    # shares with portcullis took 15-20 % off the req/s of the timed pass above.
    out=$(h2load "${shape[@]}" -t "$THREADS" -n "$(awk -v r="$rps" 'BEGIN { n = int(r); print (n < 1000 ? 1000 : n) }')" \
      --log-file="$WORK/h2.log" "${check[@]}" 2>&1)
    h2load_ok "$id" "$out" || { echo "fail" >>"$WORK/res-$id"; return; }
    # Per-request log: start(µs) status duration(µs).
    echo "$rps $(awk '{ print $3 }' "$WORK/h2.log" | sort -n | awk '{ v[NR] = $1 } END {
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      printf "%.3f %.3f", v[i50] / 1000, v[i99] / 1000 }') $(cpu_per_req "$before" "$after" "$n")" >>"$WORK/res-$id"
  fi
}

echo "rows: ${#ROWS[@]}, runs: $RUNS × ${DURATION}s, connections: $CONNECTIONS" >&2
for run in $(seq 1 "$RUNS"); do
  for row in "${ROWS[@]}"; do
    IFS='|' read -r id tool target header _ label <<<"$row"
    echo "run $run/$RUNS: $label" >&2
    # A browser re-sends the cookie portcullis last set; wrk and h2load re-send one.
    # portcullis re-seals a session (Set-Cookie) once its cookie is a minute old, so
    # with a stale cookie every request would be a renewal. A fresh login before each
    # session row (not timed) measures what a browser's requests cost.
    case "$id" in
      *-oidc-session)
        session_login
        if [ "$tool" = wrk ]; then
          header="cookie: $SESSION_COOKIE"
          # The row must measure a browser's requests, not renewals: right after the
          # login the session's answer carries no Set-Cookie.
          if curl -s -o /dev/null -D - -H "$header" "$target" | grep -qi '^set-cookie:'; then
            echo "$id: the session was renewed right after the login; the row would measure renewals (logs in $WORK)" >&2
            KEEP=1; exit 1
          fi
        else
          python3 "$ROOT/benches/check_body.py" "$target" /oidc-session/item "cookie: $SESSION_COOKIE"
        fi
        ;;
    esac
    run_row "$id" "$tool" "$target" "$header"
  done
done

# --- table -----------------------------------------------------------------------
: >"$WORK/rows.tsv"
for row in "${ROWS[@]}"; do
  IFS='|' read -r id tool _ _ base label <<<"$row"
  printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$tool" "$base" "$label" "$WORK/res-$id" >>"$WORK/rows.tsv"
done
{
  echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Envoy $(envoy --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([0-9.]*\)\/.*/\1/p') --concurrency $CONCURRENCY; wrk -t $THREADS -c $CONNECTIONS; h2load -t $THREADS -c $CONNECTIONS -m 1 (Envoy's shape: -c $MUX_CONNECTIONS -m $MUX_STREAMS); ${DURATION}s per run, median of $RUNS run(s), rows interleaved"
  echo "portcullis: $PORTCULLIS"
} >"$WORK/machine.txt"
python3 - "$WORK/rows.tsv" "$WORK/machine.txt" <<'EOF' || status=$?
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
med = {}
per_run = {}
bad = []
for rid, tool, base, label, path in rows:
    try:
        runs = [l.split() for l in open(path)]
    except FileNotFoundError:
        runs = []
    good = [list(map(float, r)) for r in runs if len(r) == 6]
    if not good or len(good) != len(runs) or any(r[0] <= 0 for r in good):
        bad.append(label)
        continue
    med[rid] = [statistics.median(r[i] for r in good) for i in range(6)]
    per_run[rid] = [r[0] for r in good]
print(open(sys.argv[2]).read().rstrip())
print()
print(f"| {'row':<64} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'ratio':>5} | {'CPU µs/req: Envoy':>17} | {'portcullis':>10} | {'nginx':>5} | baseline")
print(f"|{'-'*66}|{'-'*11}|{'-'*9}|{'-'*9}|{'-'*7}|{'-'*19}|{'-'*12}|{'-'*7}|{'-'*10}")
labels = {r[0]: r[3] for r in rows}
for rid, tool, base, label, _ in rows:
    if rid not in med:
        print(f"| {label:<64} | {'FAILED':>9} | {'':>7} | {'':>7} | {'':>5} | {'':>17} | {'':>10} | {'':>5} |")
        continue
    rps, p50, p99, env_us, pc_us, ngx_us = med[rid]
    ratio = f"{rps / med[base][0]:.2f}" if base in med else "n/a"
    bname = "itself" if base == rid else labels.get(base, base)
    print(f"| {label:<64} | {rps:>9.0f} | {p50:>7.2f} | {p99:>7.2f} | {ratio:>5} | {env_us:>17.0f} | {pc_us:>10.0f} | {ngx_us:>5.0f} | {bname}")
checks = [
    ("Envoy + portcullis jwt-auth HS256 / Envoy + portcullis no-plugin", "pc-jwt-hs", "pc-noplugin", 0.95),
    ("Envoy + portcullis jwt-auth HS256 / Envoy jwt_authn HS256", "pc-jwt-hs", "jwtn", 0.75),
    ("Envoy + portcullis openid-connect JWKS / no-plugin", "pc-oidc", "pc-noplugin", 0.85),
    ("Envoy + portcullis openid-connect introspection cache / no-plugin", "pc-oidc-intro", "pc-noplugin", 0.85),
    ("Envoy + portcullis openid-connect session cookie / no-plugin", "pc-oidc-session", "pc-noplugin", 0.85),
    ("Envoy + portcullis jwt-auth HS256 / no-plugin with the same token", "pc-jwt-hs", "pc-noplugin-hdr", None),
    ("Envoy + portcullis no-plugin / Envoy, no auth", "pc-noplugin", "envoy", None),
    ("Envoy jwt_authn / Envoy, no auth", "jwtn", "envoy", None),
    # What a server deciding nothing gets, and portcullis against it.
    ("Envoy + canned ext_authz answer / Envoy jwt_authn HS256", "canned", "jwtn", None),
    ("Envoy + portcullis no-plugin, with the token / canned answer", "pc-noplugin-hdr", "canned", None),
    ("Envoy + portcullis jwt-auth HS256 / canned answer", "pc-jwt-hs", "canned", None),
]
print()
# Rows are interleaved, so run i of one row and of its baseline ran minutes apart at
# most: each run's own ratio shows how far a verdict on the medians can move.
def spread(a, b):
    if len(per_run[a]) < 2 or len(per_run[a]) != len(per_run[b]):
        return ""
    return " (by run: " + " ".join(f"{x / y:.2f}" for x, y in zip(per_run[a], per_run[b])) + ")"
for text, a, b, target in checks:
    if a in med and b in med:
        r = med[a][0] / med[b][0]
        verdict = "" if target is None else (f"  (target ≥ {target}: {'met' if r >= target else 'MISSED'})")
        print(f"{text}: {r:.2f}{spread(a, b)}{verdict}")
if "grpc-jwt-hs" in med:
    v = med["grpc-jwt-hs"][0]
    print(f"direct Check jwt-auth HS256: {v:.0f} req/s (target ≥ 100000: {'met' if v >= 100000 else 'MISSED'})")
if "mux-jwt-hs" in med:
    v = med["mux-jwt-hs"][0]
    print(f"direct Check jwt-auth HS256, Envoy's shape: {v:.0f} req/s (target ≥ 100000: {'met' if v >= 100000 else 'MISSED'})")
if bad:
    print("\nrows without numbers: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
for r in "${PC_ROWS[@]}"; do
  if [ -n "${SKIP[$r]:-}" ]; then
    echo "skipped: $(label_of "$r") — this portcullis build refuses the route: ${SKIP[$r]}"
  fi
done
exit "${status:-0}"
