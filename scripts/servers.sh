#!/usr/bin/env bash
# PostgreSQL and an MLflow tracking server on this machine: the shared stores for running an
# ablation grid or a tuning study with workers on several machines (README, "Running on several
# machines"), and for tests/test_distributed.py.
#
#   eval "$(bash scripts/servers.sh start)"   # start (or find running); prints two exports:
#                                             #   CVAE_TEST_PG_URL      postgresql+psycopg2://…/optuna
#                                             #   CVAE_TEST_MLFLOW_URL  http://127.0.0.1:PORT
#   bash scripts/servers.sh status
#   bash scripts/servers.sh stop [--purge]    # --purge also deletes the databases and artifacts
#
# Both servers bind to 127.0.0.1 only; workers on other machines reach them through an SSH
# tunnel. PostgreSQL is installed from Debian's packages when absent (needs root or sudo).
# Settings (environment):
#   CVAE_SERVICES_DIR  state: pgdata/, artifacts/, logs, pids, env   (default: mlruns/services)
#   CVAE_PG_PORT, CVAE_MLFLOW_PORT   fixed ports (default: free ones, kept across restarts)
#   PYTHON             the interpreter that has mlflow (default: python, else python3)
set -euo pipefail

STATE=${CVAE_SERVICES_DIR:-mlruns/services}
HOST=127.0.0.1
ROLE=cvae
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project installs psycopg2-binary.
SCHEME=postgresql+psycopg2

log() { echo "servers: $*" >&2; }
die() { log "$*"; exit 1; }

python_bin() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif command -v python >/dev/null 2>&1; then echo python
  else echo python3
  fi
}

free_port() {
  "$(python_bin)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Run a command as the PostgreSQL owner: the `postgres` user when we are root (the server
# refuses to run as root), ourselves otherwise.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ] && command -v pg_config >/dev/null 2>&1; then dir=$(pg_config --bindir); fi
  if [ -n "$dir" ] && [ -x "$dir/postgres" ]; then echo "$dir"; fi
}

install_postgres() {
  [ -n "$(pg_bindir)" ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null || die "PostgreSQL is not installed and installing it needs root: apt-get install postgresql"
    sudo="sudo -n"
  fi
  log "installing PostgreSQL from Debian's packages"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql >/dev/null
  [ -n "$(pg_bindir)" ] || die "apt-get installed postgresql but no server binary was found"
}

start_postgres() {
  local bin pgdata="$STATE/pgdata"
  bin=$(pg_bindir)
  if [ ! -s "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    chmod 700 "$pgdata"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$pgdata"
    as_owner test -w "$pgdata" || die "$pgdata is not reachable by the postgres user; set CVAE_SERVICES_DIR to a folder it can reach"
    # Peer authentication on the socket (in pgdata, for the owner only), passwords over TCP.
    as_owner "$bin/initdb" -D "$pgdata" --auth-local=peer --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 ||
      { cat "$STATE/initdb.log" >&2; die "initdb failed"; }
  fi
  if as_owner "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then return 0; fi
  as_owner "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=$HOST -c port=$PG_PORT -c unix_socket_directories='$ABS_PGDATA' -c max_connections=300 -c synchronous_commit=off" \
    >/dev/null || { tail -n 20 "$pgdata/postgres.log" >&2 || true; die "PostgreSQL did not start"; }
}

psql_owner() {
  as_owner "$(pg_bindir)/psql" -h "$ABS_PGDATA" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

create_databases() {
  # Identifiers and the password are generated here (hex), so interpolating them is safe.
  if [ "$(psql_owner -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_owner -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >/dev/null
  fi
  local db
  for db in mlflow optuna; do
    if [ "$(psql_owner -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
      psql_owner -c "CREATE DATABASE $db OWNER $ROLE" >/dev/null
    fi
  done
}

start_mlflow() {
  alive "$STATE/mlflow.pid" && return 0
  mkdir -p "$STATE/artifacts"
  # The backend URI goes through the environment, not argv, so `ps` does not show the password.
  MLFLOW_BACKEND_STORE_URI="$SCHEME://$ROLE:$PASSWORD@$HOST:$PG_PORT/mlflow" \
    setsid "$(python_bin)" -m mlflow server --host "$HOST" --port "$MLFLOW_PORT" --workers 2 \
    --artifacts-destination "$ABS_STATE/artifacts" \
    >"$STATE/mlflow.log" 2>&1 </dev/null &
  echo $! >"$STATE/mlflow.pid"
  local url="http://$HOST:$MLFLOW_PORT" waited=0
  until "$(python_bin)" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "$url/health" 2>/dev/null; do
    if ! alive "$STATE/mlflow.pid" || [ "$waited" -ge 120 ]; then
      tail -n 20 "$STATE/mlflow.log" >&2 || true
      die "the MLflow server did not answer at $url/health"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

load_settings() {
  mkdir -p "$STATE"
  chmod 755 "$STATE"  # the postgres user must traverse it to reach pgdata
  ABS_STATE=$(cd "$STATE" && pwd)
  ABS_PGDATA="$ABS_STATE/pgdata"
  if [ -f "$STATE/settings" ]; then
    # shellcheck source=/dev/null
    . "$STATE/settings"
  fi
  PG_PORT=${CVAE_PG_PORT:-${PG_PORT:-$(free_port)}}
  MLFLOW_PORT=${CVAE_MLFLOW_PORT:-${MLFLOW_PORT:-$(free_port)}}
  PASSWORD=${PASSWORD:-$(openssl rand -hex 16)}
  (umask 077 && printf 'PG_PORT=%s\nMLFLOW_PORT=%s\nPASSWORD=%s\n' \
    "$PG_PORT" "$MLFLOW_PORT" "$PASSWORD" >"$STATE/settings")
}

print_env() {
  echo "export CVAE_TEST_PG_URL=$SCHEME://$ROLE:$PASSWORD@$HOST:$PG_PORT/optuna"
  echo "export CVAE_TEST_MLFLOW_URL=http://$HOST:$MLFLOW_PORT"
}

stop() {
  [ -d "$STATE" ] || return 0
  if alive "$STATE/mlflow.pid"; then
    local pid waited=0
    pid=$(cat "$STATE/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 20 ]; do sleep 0.5; waited=$((waited + 1)); done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/mlflow.pid"
  local bin
  bin=$(pg_bindir)
  if [ -n "$bin" ] && [ -s "$STATE/pgdata/PG_VERSION" ]; then
    as_owner "$bin/pg_ctl" -D "$STATE/pgdata" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ "${1:-}" = "--purge" ]; then rm -rf "$STATE"; fi
}

case "${1:-}" in
  start)
    install_postgres
    load_settings
    start_postgres
    create_databases
    start_mlflow
    umask 077
    print_env | tee "$STATE/env"
    log "PostgreSQL on $HOST:$PG_PORT, MLflow server on http://$HOST:$MLFLOW_PORT (state: $ABS_STATE)"
    ;;
  stop) stop "${2:-}" ;;
  status)
    [ -f "$STATE/settings" ] || die "not started (no $STATE/settings)"
    load_settings
    if alive "$STATE/mlflow.pid"; then mlflow=running; else mlflow=stopped; fi
    if as_owner "$(pg_bindir)/pg_ctl" -D "$STATE/pgdata" status >/dev/null 2>&1; then pg=running; else pg=stopped; fi
    echo "PostgreSQL $HOST:$PG_PORT $pg; MLflow http://$HOST:$MLFLOW_PORT $mlflow"
    ;;
  *)
    echo "usage: bash scripts/servers.sh start | status | stop [--purge]" >&2
    exit 2
    ;;
esac
