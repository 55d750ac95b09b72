# Shared by benches/load.sh and benches/scale.sh (sourced, not run): tool checks,
# the release build, a work directory whose processes are stopped on exit, and
# free loopback ports. Expects ROOT, PORTCULLIS and KEEP to be set by the caller.

# need_tools SCRIPT TOOL...: exits with a message naming the first missing tool.
need_tools() {
  local script=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$script needs $tool on PATH" >&2; exit 1; }
  done
}

# Builds portcullis in release mode unless --portcullis named a binary.
build_portcullis() {
  if [ -z "$PORTCULLIS" ]; then
    echo "building portcullis (release)…" >&2
    (cd "$ROOT" && cargo build --release --quiet --bin portcullis)
    PORTCULLIS="${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis"
  fi
}

# make_workdir NAME: sets WORK and PIDS; every pid added to PIDS is killed and
# reaped on exit, and WORK removed unless --keep.
make_workdir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-$1.XXXXXX")
  PIDS=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
