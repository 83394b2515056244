#!/usr/bin/env bash
# Baseline for `apiary bench`: PostgreSQL 15 primary + one synchronous streaming
# standby on this machine (127.0.0.1 only), single-row ~100-byte INSERT per
# transaction, driven by pgbench at several client counts.
#
# Prints to stdout (everything else goes to stderr):
#   # postgres: <version string>
#   # machine: nproc=<n> model="<cpu model>" fs=<fstype of data dir>
#   # config: ...
#   postgres-sync clients=N tps=X p50_ms=Y p99_ms=Z      (one line per client count)
#
# Must run as root on Debian 12. See bench/README.md.
set -euo pipefail

PG_VERSION=15
PG_BIN=/usr/lib/postgresql/${PG_VERSION}/bin
HOST=127.0.0.1
TLS=0

CLIENTS="1 8 32 64"
SECONDS_PER_RUN=10
WARMUP_SECONDS=2
WORKDIR_PARENT=""
PORT_PRIMARY=""
PORT_STANDBY=""

usage() {
  cat <<EOF
usage: $0 [--clients "1 8 32 64"] [--seconds 10] [--warmup 2] [--workdir DIR]
          [--port-primary PORT] [--port-standby PORT] [--workload inserts|reads] [--tls]

  --clients LIST      space-separated pgbench client counts (default: "1 8 32 64")
  --seconds N         duration of each pgbench run in seconds (default: 10)
  --warmup N          discarded pgbench warm-up run (1 client) of N seconds before
                      the measured runs; 0 disables (default: 2)
  --workdir DIR       create the throw-away clusters in a fresh subdirectory of DIR
                      (default: a mktemp dir under \${TMPDIR:-/tmp}); that subdirectory
                      is always removed on exit, DIR itself is left alone
  --port-primary P    TCP port of the primary on 127.0.0.1 (default: a free port)
  --port-standby P    TCP port of the standby on 127.0.0.1 (default: a free port)
  --workload W        inserts (default: one INSERT per transaction) or reads (one
                      SELECT by primary key of 1,000 rows per transaction, like
                      pgbench -S)
  --tls               clients connect over TLS (ssl=on with a throw-away self-signed
                      certificate, TLS 1.2 or later, pgbench with sslmode=require), as
                      Apiary's clients always do; the lines say postgres-sync-tls
EOF
}

log() { printf '[pg-sync-bench] %s\n' "$*" >&2; }
die() { printf '[pg-sync-bench] ERROR: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --clients)       [[ $# -ge 2 ]] || die "--clients needs a value"; CLIENTS="$2"; shift 2 ;;
    --clients=*)     CLIENTS="${1#*=}"; shift ;;
    --seconds)       [[ $# -ge 2 ]] || die "--seconds needs a value"; SECONDS_PER_RUN="$2"; shift 2 ;;
    --seconds=*)     SECONDS_PER_RUN="${1#*=}"; shift ;;
    --warmup)        [[ $# -ge 2 ]] || die "--warmup needs a value"; WARMUP_SECONDS="$2"; shift 2 ;;
    --warmup=*)      WARMUP_SECONDS="${1#*=}"; shift ;;
    --workdir)       [[ $# -ge 2 ]] || die "--workdir needs a value"; WORKDIR_PARENT="$2"; shift 2 ;;
    --workdir=*)     WORKDIR_PARENT="${1#*=}"; shift ;;
    --port-primary)  [[ $# -ge 2 ]] || die "--port-primary needs a value"; PORT_PRIMARY="$2"; shift 2 ;;
    --port-primary=*) PORT_PRIMARY="${1#*=}"; shift ;;
    --port-standby)  [[ $# -ge 2 ]] || die "--port-standby needs a value"; PORT_STANDBY="$2"; shift 2 ;;
    --port-standby=*) PORT_STANDBY="${1#*=}"; shift ;;
    --workload)      [[ $# -ge 2 ]] || die "--workload needs a value"; WORKLOAD="$2"; shift 2 ;;
    --workload=*)    WORKLOAD="${1#*=}"; shift ;;
    --tls)           TLS=1; shift ;;
    -h|--help)       usage; exit 0 ;;
    *)               usage >&2; die "unknown argument: $1" ;;
  esac
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

is_uint "$SECONDS_PER_RUN" && [[ "$SECONDS_PER_RUN" -ge 1 ]] || die "--seconds must be a positive integer"
is_uint "$WARMUP_SECONDS" || die "--warmup must be a non-negative integer"
WORKLOAD="${WORKLOAD:-inserts}"
[[ "$WORKLOAD" == inserts || "$WORKLOAD" == reads ]] || die "--workload takes inserts or reads"
read -r -a CLIENT_LIST <<<"$CLIENTS"
[[ ${#CLIENT_LIST[@]} -ge 1 ]] || die "--clients must list at least one client count"
MAX_CLIENTS=0
for c in "${CLIENT_LIST[@]}"; do
  is_uint "$c" && [[ "$c" -ge 1 ]] || die "--clients: '$c' is not a positive integer"
  if (( c > MAX_CLIENTS )); then MAX_CLIENTS=$c; fi
done
for p in "$PORT_PRIMARY" "$PORT_STANDBY"; do
  [[ -z "$p" ]] || { is_uint "$p" && [[ "$p" -ge 1024 && "$p" -le 65535 ]]; } \
    || die "ports must be integers in 1024..65535 (got '$p')"
done
if [[ -n "$PORT_PRIMARY" && -n "$PORT_STANDBY" && "$PORT_PRIMARY" == "$PORT_STANDBY" ]]; then
  die "--port-primary and --port-standby must differ"
fi

[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root (creates clusters owned by the postgres user)"

# Don't let the caller's libpq environment redirect any connection.
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGPASSFILE PGSERVICE \
      PGSERVICEFILE PGOPTIONS PGSSLMODE PGAPPNAME PGDATA PGTARGETSESSIONATTRS || true
export LC_ALL=C

# ---------------------------------------------------------------- 1. install
need_install=0
for b in postgres initdb pg_ctl pg_basebackup psql pgbench; do
  [[ -x "$PG_BIN/$b" ]] || need_install=1
done
if ! dpkg-query -W -f='${Status}' postgresql-contrib 2>/dev/null | grep -q 'install ok installed'; then
  need_install=1
fi
if [[ $need_install -eq 1 ]]; then
  log "installing postgresql-${PG_VERSION} and postgresql-contrib with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "postgresql-${PG_VERSION}" postgresql-contrib
fi
for b in postgres initdb pg_ctl pg_basebackup psql pgbench; do
  [[ -x "$PG_BIN/$b" ]] || die "$PG_BIN/$b missing after install"
done
command -v python3 >/dev/null || die "python3 is required (percentile computation)"
command -v runuser >/dev/null || die "runuser is required"
id postgres >/dev/null 2>&1 || die "the 'postgres' system user does not exist"

# ------------------------------------------------------- workdir and cleanup
RUN_DIR=""
PGBENCH_PID=""
STARTED_DATADIRS=()

as_pg() { runuser -u postgres -- "$@"; }

stop_cluster() {
  local dd="$1" pid=""
  [[ -f "$dd/postmaster.pid" ]] || return 0
  pid=$(head -n1 "$dd/postmaster.pid" 2>/dev/null || true)
  local stopped=0
  as_pg "$PG_BIN/pg_ctl" -D "$dd" -m fast -t 20 -w stop >/dev/null 2>&1 \
    || as_pg "$PG_BIN/pg_ctl" -D "$dd" -m immediate -t 10 -w stop >/dev/null 2>&1 \
    && stopped=1
  [[ -n "$pid" ]] && is_uint "$pid" || return 0
  # Last resort: kill only the postmaster we started (pid from its own pid file).
  if [[ $stopped -eq 0 && "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == postgres* ]]; then
    kill -9 "$pid" 2>/dev/null || true
  fi
  # pg_ctl daemonizes the postmaster, so init reaps it; wait (bounded) until it is gone.
  local i
  for (( i=0; i<50; i++ )); do
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == postgres* ]] || return 0
    sleep 0.1
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  set +e
  if [[ -n "$PGBENCH_PID" ]] && kill -0 "$PGBENCH_PID" 2>/dev/null; then
    kill "$PGBENCH_PID" 2>/dev/null; wait "$PGBENCH_PID" 2>/dev/null
  fi
  # Primary first (it would otherwise wait on the standby), then the standby.
  local i
  for (( i=0; i<${#STARTED_DATADIRS[@]}; i++ )); do
    stop_cluster "${STARTED_DATADIRS[$i]}"
  done
  if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
    cd / && rm -rf -- "$RUN_DIR"
  fi
  [[ $rc -eq 0 ]] || log "exiting with status $rc (servers stopped, $RUN_DIR removed)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [[ -n "$WORKDIR_PARENT" ]]; then
  mkdir -p -- "$WORKDIR_PARENT"
  RUN_DIR=$(mktemp -d "$(cd "$WORKDIR_PARENT" && pwd)/apiary-pg-sync.XXXXXX")
else
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/apiary-pg-sync.XXXXXX")
fi
PRIMARY_DIR="$RUN_DIR/primary"
STANDBY_DIR="$RUN_DIR/standby"
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"
chown postgres: "$RUN_DIR" "$LOG_DIR"
chmod 0700 "$RUN_DIR"
cd "$RUN_DIR"
as_pg test -w "$RUN_DIR" \
  || die "user postgres cannot write $RUN_DIR (a parent directory is not traversable by postgres; pick another --workdir)"

FS_TYPE=$(df --output=fstype "$RUN_DIR" 2>/dev/null | tail -n1 | tr -d '[:space:]' || true)
FS_TYPE=${FS_TYPE:-unknown}
if [[ "$FS_TYPE" == tmpfs || "$FS_TYPE" == ramfs ]]; then
  log "WARNING: $RUN_DIR is on $FS_TYPE: fsync is a no-op there, results will be optimistic; use --workdir on a real disk"
fi

# ------------------------------------------------------------------- ports
pick_free_ports() {
  python3 - <<'PY'
import socket
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}
if [[ -z "$PORT_PRIMARY" || -z "$PORT_STANDBY" ]]; then
  read -r p1 p2 < <(pick_free_ports)
  if [[ -z "$PORT_PRIMARY" ]]; then
    PORT_PRIMARY=$p1; [[ "$PORT_PRIMARY" != "$PORT_STANDBY" ]] || PORT_PRIMARY=$p2
  fi
  if [[ -z "$PORT_STANDBY" ]]; then
    PORT_STANDBY=$p2; [[ "$PORT_STANDBY" != "$PORT_PRIMARY" ]] || PORT_STANDBY=$p1
  fi
fi

# --------------------------------------------------------------- 2. primary
MAX_CONNECTIONS=$(( MAX_CLIENTS + 20 ))
(( MAX_CONNECTIONS >= 100 )) || MAX_CONNECTIONS=100

log "workdir $RUN_DIR (fs=$FS_TYPE), primary 127.0.0.1:$PORT_PRIMARY, standby 127.0.0.1:$PORT_STANDBY"
as_pg "$PG_BIN/initdb" -D "$PRIMARY_DIR" -U postgres --auth=trust --encoding=UTF8 \
  --locale=C >"$LOG_DIR/initdb.log" 2>&1 || { cat "$LOG_DIR/initdb.log" >&2; die "initdb failed"; }

# pg_hba: only loopback TCP (initdb's default also has loopback 'replication' lines;
# replace the file so nothing but 127.0.0.1 is ever accepted).
cat >"$PRIMARY_DIR/pg_hba.conf" <<'EOF'
# TYPE  DATABASE     USER      ADDRESS        METHOD
host    all          postgres  127.0.0.1/32   trust
host    replication  postgres  127.0.0.1/32   trust
EOF
chown postgres: "$PRIMARY_DIR/pg_hba.conf"

cat >>"$PRIMARY_DIR/postgresql.conf" <<EOF

# ---- apiary bench (postgres-sync-replication.sh) ----
listen_addresses = '127.0.0.1'
port = $PORT_PRIMARY
unix_socket_directories = ''
max_connections = $MAX_CONNECTIONS
wal_level = replica
max_wal_senders = 4
max_replication_slots = 4
synchronous_commit = on
synchronous_standby_names = 'standby1'
fsync = on
full_page_writes = on
hot_standby = on
EOF

# --tls: the clients' connections encrypted, with a certificate made for this run only.
if [[ "${TLS:-0}" == 1 ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
    -keyout "$PRIMARY_DIR/server.key" -out "$PRIMARY_DIR/server.crt" >"$LOG_DIR/openssl.log" 2>&1 \
    || { cat "$LOG_DIR/openssl.log" >&2; die "cannot make the TLS certificate"; }
  chown postgres: "$PRIMARY_DIR/server.key" "$PRIMARY_DIR/server.crt"
  chmod 600 "$PRIMARY_DIR/server.key"
  cat >>"$PRIMARY_DIR/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
fi

start_cluster() {
  local dd="$1" name="$2"
  STARTED_DATADIRS+=("$dd")
  if ! as_pg "$PG_BIN/pg_ctl" -D "$dd" -l "$LOG_DIR/$name.log" -w -t 60 start >/dev/null; then
    tail -n 40 "$LOG_DIR/$name.log" >&2 || true
    die "could not start $name"
  fi
}

PSQL_P=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT_PRIMARY" -U postgres)
PSQL_S=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT_STANDBY" -U postgres)
psql_p() { timeout 120 "${PSQL_P[@]}" "$@"; }
psql_s() { timeout 120 "${PSQL_S[@]}" "$@"; }

start_cluster "$PRIMARY_DIR" primary

# --------------------------------------------------------------- standby
log "pg_basebackup -> standby"
if ! as_pg timeout 600 "$PG_BIN/pg_basebackup" \
      -d "host=$HOST port=$PORT_PRIMARY user=postgres application_name=standby1" \
      -D "$STANDBY_DIR" -R -X stream -c fast -C -S standby1_slot \
      >"$LOG_DIR/basebackup.log" 2>&1; then
  cat "$LOG_DIR/basebackup.log" >&2
  die "pg_basebackup failed"
fi
# Standby overrides: its own port, and an explicit primary_conninfo carrying
# application_name=standby1 (postgresql.auto.conf is read last, so these win).
cat >>"$STANDBY_DIR/postgresql.auto.conf" <<EOF
port = $PORT_STANDBY
primary_conninfo = 'host=$HOST port=$PORT_PRIMARY user=postgres application_name=standby1'
primary_slot_name = 'standby1_slot'
EOF
chown postgres: "$STANDBY_DIR/postgresql.auto.conf"
[[ -f "$STANDBY_DIR/standby.signal" ]] || die "pg_basebackup -R did not write standby.signal"
start_cluster "$STANDBY_DIR" standby

wait_for_sync() {
  local state="" i
  for (( i=0; i<60; i++ )); do
    state=$(psql_p -At -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1' AND state = 'streaming'" 2>/dev/null || true)
    [[ "$state" == sync ]] && return 0
    sleep 0.5
  done
  log "pg_stat_replication on the primary:"
  psql_p -c "SELECT application_name, client_addr, state, sync_state FROM pg_stat_replication" >&2 || true
  tail -n 20 "$LOG_DIR/standby.log" >&2 || true
  die "standby 'standby1' is not a streaming synchronous standby (sync_state='${state:-none}')"
}
wait_for_sync
[[ "$(psql_s -At -c 'SELECT pg_is_in_recovery()')" == t ]] || die "standby is not in recovery"
log "standby1 is streaming with sync_state=sync"

# --------------------------------------------------------------- 3. schema
psql_p -c "CREATE DATABASE apiary_bench"
psql_p -d apiary_bench -c "CREATE TABLE bench (id bigserial PRIMARY KEY, payload text NOT NULL)"

if [[ "$WORKLOAD" == reads ]]; then
  psql_p -d apiary_bench -c "INSERT INTO bench(payload) SELECT repeat('x', 100) FROM generate_series(1, 1000)"
  cat >"$RUN_DIR/insert.sql" <<'EOF'
\set id random(1, 1000)
SELECT payload FROM bench WHERE id = :id;
EOF
  TXN_TEXT="1 SELECT by primary key of 1,000 100-byte rows per txn"
else
  cat >"$RUN_DIR/insert.sql" <<'EOF'
INSERT INTO bench(payload) VALUES (repeat('x', 100));
EOF
  TXN_TEXT="1 INSERT of 100-byte payload per txn"
fi

# --------------------------------------------------------------- header
PG_VERSION_STR=$(psql_p -At -c "SELECT version()")
NPROC=$(nproc)
CPU_MODEL=$(grep -m1 -E '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' || true)
echo "# postgres: $PG_VERSION_STR"
echo "# machine: nproc=$NPROC model=\"${CPU_MODEL:-unknown}\" fs=$FS_TYPE"
echo "# config: primary+1 sync standby on 127.0.0.1 (same host), synchronous_commit=on fsync=on full_page_writes=on, $TXN_TEXT, ${SECONDS_PER_RUN}s per run after a ${WARMUP_SECONDS}s warm-up"

# --------------------------------------------------------------- 4. runs
percentiles() {
  # Args: pgbench per-transaction log files. 3rd column = latency in µs.
  python3 - "$@" <<'PY'
import math, sys
lat = []
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                lat.append(int(parts[2]))
if not lat:
    sys.exit("no completed transactions in pgbench log")
lat.sort()
def pct(p):  # nearest-rank
    return lat[max(0, math.ceil(p * len(lat)) - 1)] / 1000.0
print(f"{pct(0.50):.3f} {pct(0.99):.3f} {len(lat)}")
PY
}

if (( WARMUP_SECONDS > 0 )); then
  log "warm-up: pgbench clients=1 seconds=$WARMUP_SECONDS (discarded)"
  timeout --kill-after=10 $(( WARMUP_SECONDS + 60 )) \
    env PGSSLMODE="$([[ "${TLS:-0}" == 1 ]] && echo require || echo prefer)" "$PG_BIN/pgbench" -n -h "$HOST" -p "$PORT_PRIMARY" -U postgres \
      -c 1 -j 1 -T "$WARMUP_SECONDS" -f "$RUN_DIR/insert.sql" \
      apiary_bench >"$LOG_DIR/warmup.out" 2>&1 &
  PGBENCH_PID=$!
  wait "$PGBENCH_PID" || { PGBENCH_PID=""; cat "$LOG_DIR/warmup.out" >&2; die "warm-up pgbench failed"; }
  PGBENCH_PID=""
fi

for c in "${CLIENT_LIST[@]}"; do
  threads=$(( c < 2 ? c : 2 ))
  # Same starting point for every client count (reads keep their rows).
  [[ "$WORKLOAD" == reads ]] || psql_p -d apiary_bench -c "TRUNCATE bench RESTART IDENTITY" -c "CHECKPOINT"
  wait_for_sync

  prefix="$LOG_DIR/pgbench_c${c}"
  log "pgbench clients=$c threads=$threads seconds=$SECONDS_PER_RUN"
  timeout --kill-after=10 $(( SECONDS_PER_RUN + 60 )) \
    env PGSSLMODE="$([[ "${TLS:-0}" == 1 ]] && echo require || echo prefer)" "$PG_BIN/pgbench" -n -h "$HOST" -p "$PORT_PRIMARY" -U postgres \
      -c "$c" -j "$threads" -T "$SECONDS_PER_RUN" -f "$RUN_DIR/insert.sql" \
      -l --log-prefix="$prefix" apiary_bench >"$prefix.out" 2>&1 &
  PGBENCH_PID=$!
  if ! wait "$PGBENCH_PID"; then
    PGBENCH_PID=""
    cat "$prefix.out" >&2
    die "pgbench failed for clients=$c"
  fi
  PGBENCH_PID=""

  tps=$(awk '/^tps = / { print $3; exit }' "$prefix.out")
  [[ -n "$tps" ]] || { cat "$prefix.out" >&2; die "could not parse tps from pgbench output"; }
  shopt -s nullglob
  logs=("$prefix".*)
  shopt -u nullglob
  logfiles=()
  for f in "${logs[@]}"; do [[ "$f" == "$prefix.out" ]] || logfiles+=("$f"); done
  [[ ${#logfiles[@]} -ge 1 ]] || die "pgbench wrote no per-transaction log for clients=$c"
  pct_out=$(percentiles "${logfiles[@]}") || die "could not compute percentiles for clients=$c"
  read -r p50 p99 ntx <<<"$pct_out"
  grep -E '^(number of transactions actually processed|number of failed transactions|latency average|tps)' \
    "$prefix.out" | sed 's/^/    /' >&2 || true

  # The standby must still be synchronous after the run (PostgreSQL never
  # silently degrades to async, but fail loudly if something went wrong).
  wait_for_sync
  printf 'postgres-sync%s clients=%d tps=%.1f p50_ms=%s p99_ms=%s\n' "$([[ "${TLS:-0}" == 1 ]] && echo -tls)" "$c" "$tps" "$p50" "$p99"
  log "clients=$c: $ntx transactions logged"
done

rows_p=$(psql_p -d apiary_bench -At -c "SELECT count(*) FROM bench")
log "done; last run left $rows_p rows on the primary"
exit 0
