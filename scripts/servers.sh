#!/usr/bin/env bash
# PostgreSQL and an MLflow tracking server on this machine: the shared stores for running an
# ablation grid or a tuning study with workers on several machines (README, "Running on several
# machines"), and for tests/test_distributed.py.
#
#   eval "$(bash scripts/servers.sh start [--auth])"   # start (or find running); prints exports:
#                                     #   CVAE_TEST_PG_URL      postgresql+psycopg2://…/optuna
#                                     #   CVAE_TEST_MLFLOW_URL  http://127.0.0.1:PORT
#                                     #   CVAE_SERVICES_DIR     the state folder
#                                     #   with --auth: MLFLOW_TRACKING_USERNAME, _PASSWORD
#   bash scripts/servers.sh status
#   bash scripts/servers.sh stop [--purge]    # --purge also deletes the databases and artifacts
#
# Both servers bind to 127.0.0.1 only; workers on other machines reach them through an SSH
# tunnel. PostgreSQL is installed from Debian's packages when absent (needs root or sudo).
# --auth locks the MLflow server with MLflow's basic-auth app: every request needs the user
# and password of the settings file (clients: MLFLOW_TRACKING_USERNAME / _PASSWORD in the
# environment). A server once started with --auth stays locked on later starts.
# Everything in the state folder is readable by its owner only (umask 077; the folder itself
# 711, so that the postgres user can reach pgdata), and no password is ever on a command line
# (`ps` shows every user's): the servers get theirs through the environment or a mode-600
# file, psql on stdin.
# Settings (environment):
#   CVAE_SERVICES_DIR  state: pgdata/, artifacts/, logs, pids, env   (default: mlruns/services)
#   CVAE_PG_PORT, CVAE_MLFLOW_PORT   fixed ports (default: free ones, kept across restarts)
#   PYTHON             the interpreter that has mlflow (default: python, else python3)
set -euo pipefail
umask 077

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
  # The password goes to psql on stdin (printf is a shell builtin): `psql -c "... PASSWORD"`
  # would show it in `ps` to every user while psql runs.
  if [ "$(psql_owner -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    printf "CREATE ROLE %s LOGIN PASSWORD '%s';\n" "$ROLE" "$PASSWORD" | psql_owner >/dev/null
  fi
  local db
  for db in mlflow optuna mlflow_auth; do
    if [ "$(psql_owner -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
      psql_owner -c "CREATE DATABASE $db OWNER $ROLE" >/dev/null
    fi
  done
}

# MLflow's basic-auth app reads its settings from this file (MLFLOW_AUTH_CONFIG_PATH): the
# admin user, created on the first start, and its user store in PostgreSQL. Requests without
# valid credentials get 401; users other than the admin get no permission unless granted one.
# Checked credentials are cached for 60 s per server worker (a PBKDF2 hash per request slows
# every client otherwise), so a changed password reaches every worker within a minute.
write_auth_config() {
  cat >"$STATE/basic_auth.ini" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = $SCHEME://$ROLE:$PASSWORD@$HOST:$PG_PORT/mlflow_auth
admin_username = $ROLE
admin_password = $MLFLOW_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
EOF
}

start_mlflow() {
  if alive "$STATE/mlflow.pid"; then
    if [ "$MLFLOW_AUTH" = 1 ] && [ ! -f "$STATE/basic_auth.ini" ]; then
      die "the MLflow server runs without authentication: stop it first (bash scripts/servers.sh stop), then start --auth"
    fi
    return 0
  fi
  mkdir -p "$STATE/artifacts"
  chmod -R go= "$STATE/artifacts"  # artifacts of a server from before this umask
  local app=()
  rm -f "$STATE/basic_auth.ini"
  if [ "$MLFLOW_AUTH" = 1 ]; then
    write_auth_config
    app=(--app-name basic-auth)
  fi
  # The backend URI and the auth settings go through the environment, not argv, so `ps` does
  # not show the passwords. Job execution (GenAI evaluation jobs) is off: nothing here uses it,
  # and its job runner and consumers are seven more processes.
  MLFLOW_BACKEND_STORE_URI="$SCHEME://$ROLE:$PASSWORD@$HOST:$PG_PORT/mlflow" \
    MLFLOW_AUTH_CONFIG_PATH="$ABS_STATE/basic_auth.ini" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$SECRET_KEY" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    setsid "$(python_bin)" -m mlflow server "${app[@]}" --host "$HOST" --port "$MLFLOW_PORT" \
    --workers 2 --artifacts-destination "$ABS_STATE/artifacts" \
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

# $1: "--auth" to lock the MLflow server (kept in the settings for later starts).
load_settings() {
  (umask 022 && mkdir -p "$(dirname "$STATE")")  # the postgres user traverses the parents
  mkdir -p "$STATE"
  chmod 711 "$STATE"  # the postgres user must traverse it to reach pgdata; nobody may list it
  ABS_STATE=$(cd "$STATE" && pwd)
  ABS_PGDATA="$ABS_STATE/pgdata"
  if [ -f "$STATE/settings" ]; then
    # shellcheck source=/dev/null
    . "$STATE/settings"
  fi
  find "$STATE" -maxdepth 1 -type f -exec chmod go= {} +  # files of a run before the umask
  PG_PORT=${CVAE_PG_PORT:-${PG_PORT:-$(free_port)}}
  MLFLOW_PORT=${CVAE_MLFLOW_PORT:-${MLFLOW_PORT:-$(free_port)}}
  PASSWORD=${PASSWORD:-$(openssl rand -hex 16)}
  MLFLOW_PASSWORD=${MLFLOW_PASSWORD:-$(openssl rand -hex 16)}
  SECRET_KEY=${SECRET_KEY:-$(openssl rand -hex 32)}
  MLFLOW_AUTH=${MLFLOW_AUTH:-0}
  if [ "${1:-}" = "--auth" ]; then MLFLOW_AUTH=1; fi
  printf 'PG_PORT=%s\nMLFLOW_PORT=%s\nPASSWORD=%s\nMLFLOW_AUTH=%s\nMLFLOW_PASSWORD=%s\nSECRET_KEY=%s\n' \
    "$PG_PORT" "$MLFLOW_PORT" "$PASSWORD" "$MLFLOW_AUTH" "$MLFLOW_PASSWORD" "$SECRET_KEY" \
    >"$STATE/settings"
}

print_env() {
  echo "export CVAE_TEST_PG_URL=$SCHEME://$ROLE:$PASSWORD@$HOST:$PG_PORT/optuna"
  echo "export CVAE_TEST_MLFLOW_URL=http://$HOST:$MLFLOW_PORT"
  echo "export CVAE_SERVICES_DIR=$ABS_STATE"
  if [ "$MLFLOW_AUTH" = 1 ]; then
    echo "export MLFLOW_TRACKING_USERNAME=$ROLE"
    echo "export MLFLOW_TRACKING_PASSWORD=$MLFLOW_PASSWORD"
  fi
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
    case "${2:-}" in
      ""|--auth) ;;
      *) die "unknown option ${2}; usage: bash scripts/servers.sh start [--auth]" ;;
    esac
    install_postgres
    load_settings "${2:-}"
    start_postgres
    create_databases
    start_mlflow
    print_env | tee "$STATE/env"
    lock=""
    if [ "$MLFLOW_AUTH" = 1 ]; then lock=" (basic-auth: user $ROLE, password in $ABS_STATE/settings)"; fi
    log "PostgreSQL on $HOST:$PG_PORT, MLflow server on http://$HOST:$MLFLOW_PORT$lock (state: $ABS_STATE)"
    ;;
  stop) stop "${2:-}" ;;
  status)
    [ -f "$STATE/settings" ] || die "not started (no $STATE/settings)"
    load_settings
    if alive "$STATE/mlflow.pid"; then mlflow=running; else mlflow=stopped; fi
    if [ "$mlflow" = running ] && [ -f "$STATE/basic_auth.ini" ]; then mlflow="running (basic-auth)"; fi
    if as_owner "$(pg_bindir)/pg_ctl" -D "$STATE/pgdata" status >/dev/null 2>&1; then pg=running; else pg=stopped; fi
    echo "PostgreSQL $HOST:$PG_PORT $pg; MLflow http://$HOST:$MLFLOW_PORT $mlflow"
    ;;
  *)
    echo "usage: bash scripts/servers.sh start [--auth] | status | stop [--purge]" >&2
    exit 2
    ;;
esac
