#!/usr/bin/env bash
# Provides every peer the test suite needs, prints one line per peer, then runs COMMAND with the peers'
# addresses in the environment. `make test` (and so `.ci/run`) runs lint + pytest through it:
#
#   tests/peers.sh [COMMAND ...]        e.g. tests/peers.sh make lint pytest
#
# - Debian packages (Orthanc and its DICOMweb and Web Viewer plugins, DCMTK, dicom3tools, Chromium, Redis,
#   PostgreSQL, python3-venv, npm): installed when missing if we are root; otherwise the exact
#   `sudo apt-get install` line is printed and nothing runs.
# - Redis / PostgreSQL: the running ones are used when they answer (127.0.0.1:6379; postgres@127.0.0.1:5432
#   database `test`, trust auth). Otherwise a private server is started for this run only, on a free port
#   with its data under build/peers/, and stopped when the run ends, whatever its outcome. The machine's
#   own services are never touched.
# - OHIF: the pinned @ohif/app build is unpacked into build/ohif/dist (CXR_OHIF_DIST) once.
#
# Environment: CXR_TEST_REDIS_HOST / CXR_TEST_REDIS_PORT / CXR_TEST_POSTGRES_ADMIN_URL say where to look for
# running servers (tests/conftest.py reads the same variables; a private server overwrites them).
# CXR_PEERS_PRIVATE=1 starts private Redis and PostgreSQL even when running ones answer.
# CXR_PEERS_ASSUME_MISSING="pkg ..." treats those Debian packages as missing (to exercise the install path).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
read -ra make_cmd <<<"${MAKE:-make} --no-print-directory"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
OHIF_VERSION=3.13.2
PEERS_DIR=$ROOT/build/peers
RUN_DIR=$PEERS_DIR/run-$$

line() { printf 'peer %-17s %-9s %s\n' "$1" "$2" "$3"; }
# One clear line for a peer we could not provide, then stop (the EXIT trap stops what did start).
die() {
  line "$1" FAILED "$2"
  shift 2
  for log in "$@"; do [ -f "$log" ] && sed -n '$p' "$log" | sed 's/^/    last log line: /'; done
  exit 1
}
# Upstream version of an installed Debian package ("5:7.0.15-1~deb12u10" -> "7.0.15"), empty if none.
deb_version() {
  dpkg-query -W -f '${Version}' "$1" 2>/dev/null | sed -E 's/^[0-9]+://; s/-[^-]*$//; s/\+(dfsg|ds|repack).*//'
}
have() { command -v "$1" >/dev/null 2>&1; }

# --------------------------------------------------------------------------------------- Debian packages

# build/ohif/VERSION names the unpacked release; without it, any dist with an index.html is taken as is.
ohif_ready() {
  [ -f build/ohif/dist/index.html ] && [ "$(cat build/ohif/VERSION 2>/dev/null || echo "$OHIF_VERSION")" = "$OHIF_VERSION" ]
}
pg_bin() { find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname; }

# package -> present? (by the file the tests or this script use)
present() {
  case " ${CXR_PEERS_ASSUME_MISSING:-} " in *" $1 "*) return 1 ;; esac
  has_files "$1"
}
has_files() {
  case $1 in
    orthanc) [ -x /usr/sbin/Orthanc ] || have Orthanc ;;
    orthanc-dicomweb) [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] ;;
    orthanc-webviewer) [ -f /usr/share/orthanc/plugins/libOrthancWebViewer.so ] ;;
    dcmtk) [ -x /usr/bin/storescu ] || have storescu ;;
    dicom3tools) [ -x /usr/bin/dciodvfy ] || have dciodvfy ;;
    chromium) [ -x /usr/bin/chromium ] ;;
    redis-server) [ -x /usr/bin/redis-server ] || have redis-server ;;
    redis-tools) [ -x /usr/bin/redis-cli ] || have redis-cli ;;
    postgresql) [ -n "$(pg_bin)" ] ;;
    python3-venv) [ -f "$VENV/.installed" ] || "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ;;
    npm) ohif_ready || have npm ;;
  esac
}

installed_now=" "
missing=()
for pkg in orthanc orthanc-dicomweb orthanc-webviewer dcmtk dicom3tools chromium redis-server redis-tools \
  postgresql python3-venv npm; do
  present "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs Debian packages that are missing; install them, then run make test again:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 2
  fi
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep maintainer scripts from starting services (Orthanc would hold 4242/8042; there may be no init
  # system at all): the tests start their own Orthancs, and this script its own Redis/PostgreSQL.
  policy_rc=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
    chmod +x "$policy_rc"
    made_policy=1
  fi
  status=0
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } || status=$?
  [ -z "$made_policy" ] || rm -f "$policy_rc"
  [ "$status" -eq 0 ] || { echo "apt-get install ${missing[*]} failed (exit $status)" >&2; exit 1; }
  # A policy-rc.d we did not write may have let Debian start Orthanc: the tests never want that one.
  case " ${missing[*]} " in *" orthanc "*) service orthanc stop >/dev/null 2>&1 || true ;; esac
  installed_now=" ${missing[*]} "
  for pkg in "${missing[@]}"; do has_files "$pkg" || die "$pkg" "still missing after apt-get install $pkg"; done
fi
how() { case $installed_now in *" $1 "*) echo installed ;; *) echo found ;; esac; }

# ------------------------------------------------------------------------------------------- the peers

if "${make_cmd[@]}" -q install 2>/dev/null; then
  venv_how=found
else
  "${make_cmd[@]}" install || die python-venv "make install failed"
  venv_how=installed
fi
py=$ROOT/$VENV/bin/python
[ -x "$py" ] || py=$VENV/bin/python
line python-venv "$venv_how" "$("$py" -c 'import platform; print(platform.python_version())') ($VENV)"

orthanc_bin=/usr/sbin/Orthanc
[ -x "$orthanc_bin" ] || orthanc_bin=$(command -v Orthanc)
line orthanc "$(how orthanc)" "$("$orthanc_bin" --version 2>/dev/null | sed -n '1s/.* //p')"
line orthanc-dicomweb "$(how orthanc-dicomweb)" "$(deb_version orthanc-dicomweb)"
line orthanc-webviewer "$(how orthanc-webviewer)" "$(deb_version orthanc-webviewer)"
line dcmtk "$(how dcmtk)" "$(storescu --version 2>/dev/null | sed -nE '1s/.* v([0-9.]+) .*/\1/p')"
line dicom3tools "$(how dicom3tools)" "$(deb_version dicom3tools)"
line chromium "$(how chromium)" "$(/usr/bin/chromium --version 2>/dev/null | sed -nE '1s/[^0-9]*([0-9.]+).*/\1/p')"

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_until() { # SECONDS COMMAND...
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# Stops a run's private servers and drops their data: this run's at exit, and those of runs that were
# killed before their trap ran (their pid is gone) at start.
stop_run() { # RUN_DIR
  local pids=() pid
  if [ -f "$1/redis/redis.pid" ]; then pids+=("$(cat "$1/redis/redis.pid")"); fi
  if [ -f "$1/pg/data/postmaster.pid" ]; then pids+=("$(sed -n 1p "$1/pg/data/postmaster.pid")"); fi
  # SIGINT: PostgreSQL's fast shutdown; Redis shuts down on it too (nothing to save).
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait_until 15 not_alive "$pid" || kill -KILL "$pid" 2>/dev/null || true; done
  if [ -L "$1/pg" ]; then rm -rf "$(readlink "$1/pg")"; fi
  rm -rf "$1"
}
not_alive() { ! kill -0 "$1" 2>/dev/null; }
for old in "$PEERS_DIR"/run-*; do
  [ -d "$old" ] || continue
  kill -0 "${old##*/run-}" 2>/dev/null || stop_run "$old"
done
cleanup() { [ ! -d "$RUN_DIR" ] || stop_run "$RUN_DIR"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# As root, PostgreSQL must run as an unprivileged user (initdb refuses root).
pg_user=
if [ "$(id -u)" -eq 0 ]; then
  pg_user=postgres
  id -u postgres >/dev/null 2>&1 || pg_user=nobody
fi
as_pg() { if [ -n "$pg_user" ]; then (cd / && runuser -u "$pg_user" -- "$@"); else "$@"; fi; }

# --- Redis
redis_host=${CXR_TEST_REDIS_HOST:-127.0.0.1}
redis_port=${CXR_TEST_REDIS_PORT:-6379}
redis_ping() { [ "$(redis-cli -h "$1" -p "$2" ping 2>/dev/null)" = PONG ]; }
redis_version() { redis-cli -h "$1" -p "$2" info server 2>/dev/null | sed -n 's/^redis_version:\([^[:space:]]*\).*/\1/p'; }
if [ "${CXR_PEERS_PRIVATE:-}" != 1 ] && redis_ping "$redis_host" "$redis_port"; then
  line redis found "$(redis_version "$redis_host" "$redis_port") ($redis_host:$redis_port)"
else
  redis_dir=$RUN_DIR/redis
  mkdir -p "$redis_dir"
  redis_host=127.0.0.1
  redis_port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$redis_dir" --save '' --appendonly no \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" >/dev/null \
    || die redis "redis-server did not start" "$redis_dir/redis.log"
  wait_until 20 redis_ping "$redis_host" "$redis_port" \
    || die redis "private redis-server on port $redis_port does not answer" "$redis_dir/redis.log"
  line redis started "$(redis_version "$redis_host" "$redis_port") (private, port $redis_port)"
fi
export CXR_TEST_REDIS_HOST=$redis_host CXR_TEST_REDIS_PORT=$redis_port

# --- PostgreSQL
pg_bin=$(pg_bin)
pg_url=${CXR_TEST_POSTGRES_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/test}
pg_version() { PGCONNECT_TIMEOUT=3 "$pg_bin/psql" -w -XAtc 'show server_version' "$1" 2>/dev/null | sed 's/ .*//'; }
if [ "${CXR_PEERS_PRIVATE:-}" != 1 ] && version=$(pg_version "$pg_url") && [ -n "$version" ]; then
  line postgresql found "$version (${pg_url#postgresql://})"
else
  pg_dir=$RUN_DIR/pg
  mkdir -p "$pg_dir"
  [ -z "$pg_user" ] || chown "$pg_user" "$pg_dir"
  if ! as_pg test -w "$pg_dir"; then
    # A clone under a private directory (/root/...): the server's user cannot reach build/, so its data
    # goes to /tmp, linked from the run directory (stop_run removes both).
    rmdir "$pg_dir"
    ln -s "$(mktemp -d "${TMPDIR:-/tmp}/cxr-peers-pg.XXXXXX")" "$pg_dir"
    pg_dir=$(readlink "$pg_dir")
    [ -z "$pg_user" ] || chown "$pg_user" "$pg_dir"
    as_pg test -w "$pg_dir" || die postgresql "user ${pg_user:-$(id -un)} cannot write $pg_dir"
  fi
  pg_port=$(free_port)
  as_pg "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$pg_dir/initdb.log" 2>&1 \
    || die postgresql "initdb failed" "$pg_dir/initdb.log"
  # Throw-away cluster: TCP on loopback only (no socket file in a deep path), no durability.
  cat >>"$pg_dir/data/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/postgres.log" -w -t 60 start >/dev/null \
    || die postgresql "private PostgreSQL on port $pg_port did not start" "$pg_dir/postgres.log"
  "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres -w test \
    || die postgresql "could not create database test" "$pg_dir/postgres.log"
  pg_url=postgresql://postgres@127.0.0.1:$pg_port/test
  line postgresql started "$(pg_version "$pg_url") (private, port $pg_port)"
fi
export CXR_TEST_POSTGRES_ADMIN_URL=$pg_url

# --- OHIF viewer build (npm pack checks the registry's integrity hash)
if ohif_ready; then
  line ohif found "$OHIF_VERSION (build/ohif/dist)"
else
  mkdir -p build/ohif
  unpack=$(mktemp -d build/ohif/unpack.XXXXXX)
  (cd "$unpack" && npm pack --silent "@ohif/app@$OHIF_VERSION" >npm.log 2>&1) \
    || { sed -n '$p' "$unpack/npm.log"; rm -rf "$unpack"; die ohif "npm pack @ohif/app@$OHIF_VERSION failed"; }
  tar -xzf "$unpack"/ohif-app-*.tgz -C "$unpack" package/dist \
    || { rm -rf "$unpack"; die ohif "could not unpack @ohif/app@$OHIF_VERSION"; }
  # Swap in whole, so a concurrent run never sees half a build.
  rm -rf build/ohif/dist.old
  [ ! -d build/ohif/dist ] || mv build/ohif/dist build/ohif/dist.old
  mv "$unpack/package/dist" build/ohif/dist
  echo "$OHIF_VERSION" >build/ohif/VERSION
  rm -rf "$unpack" build/ohif/dist.old
  ohif_ready || die ohif "build/ohif/dist/index.html missing after unpacking @ohif/app@$OHIF_VERSION"
  line ohif installed "$OHIF_VERSION (build/ohif/dist)"
fi
export CXR_OHIF_DIST=$ROOT/build/ohif/dist

if [ -d ../shared ]; then
  line shared-data found "$(cd ../shared && pwd)"
else
  case ${CI:-} in 1 | true | yes) die shared-data "../shared is absent (CI=true: tests that need it would fail)" ;; esac
  line shared-data missing "../shared is absent: tests that need it skip"
fi

[ "$#" -eq 0 ] || "$@"
