#!/usr/bin/env bash
# dev-services.sh: make the PostgreSQL and NATS JetStream servers that deepnode needs reachable.
#
#   scripts/dev-services.sh up      for each of DATABASE_URL and NATS_URL: if a server already answers,
#                                   reuse it and start nothing; else, if a Docker engine answers, run
#                                   `docker compose up -d --wait` for it; else start a throwaway local
#                                   server from installed binaries (apt-get installing them if absent).
#   scripts/dev-services.sh down    stop only what `up` started (never a server that was already running)
#                                   and delete its throwaway data.
#   scripts/dev-services.sh status  say whether each server answers and whether `up` started it.
#
# Environment: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/deepnode), NATS_URL (default
# nats://127.0.0.1:4222), DEEPNODE_DEV_DIR (records of what `up` started; default <repo>/.dev/services),
# DEEPNODE_WAIT_SECS (how long to wait for a server to answer; default 60).
#
# It deliberately never stops, restarts or reconfigures a server it did not start, and only starts
# servers on loopback addresses. Throwaway Postgres data lives in a mktemp directory under $TMPDIR.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/deepnode}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
STATE_DIR=${DEEPNODE_DEV_DIR:-$REPO_ROOT/.dev/services}
WAIT_SECS=${DEEPNODE_WAIT_SECS:-60}
COMPOSE_FILE=$REPO_ROOT/docker-compose.yml

log() { printf 'dev-services: %s\n' "$*"; }
die() {
    printf 'dev-services: error: %s\n' "$*" >&2
    exit 1
}

# parse_url URL DEFAULT_PORT: sets U_USER U_PASS U_HOST U_PORT U_PATH (no percent-decoding).
parse_url() {
    local rest=${1#*://} auth="" hostport after
    rest=${rest%%,*}  # NATS_URL may list several servers: the first one is ours
    rest=${rest%%\?*}
    hostport=${rest%%/*}
    U_PATH=""
    [[ $rest == */* ]] && U_PATH=${rest#*/}
    if [[ $hostport == *@* ]]; then
        auth=${hostport%@*}
        hostport=${hostport##*@}
    fi
    U_USER=${auth%%:*}
    U_PASS=""
    [[ $auth == *:* ]] && U_PASS=${auth#*:}
    if [[ $hostport == \[* ]]; then  # [::1]:5432
        U_HOST=${hostport%%]*}
        U_HOST=${U_HOST#[}
        after=${hostport#*]}
        U_PORT=${after#:}
    else
        U_HOST=${hostport%%:*}
        U_PORT=""
        [[ $hostport == *:* ]] && U_PORT=${hostport##*:}
    fi
    U_HOST=${U_HOST:-127.0.0.1}
    U_PORT=${U_PORT:-$2}
    [[ $U_PORT =~ ^[0-9]+$ ]] || die "cannot read a port from '$1'"
}

parse_url "$DATABASE_URL" 5432
PG_HOST=$U_HOST PG_PORT=$U_PORT PG_USER=${U_USER:-postgres} PG_PASS=$U_PASS
PG_DB=${U_PATH:-$PG_USER}
parse_url "$NATS_URL" 4222
NATS_HOST=$U_HOST NATS_PORT=$U_PORT
if [[ -n $PG_PASS ]]; then export PGPASSWORD=$PG_PASS; fi
export PGCONNECT_TIMEOUT=3

is_loopback() { [[ $1 == localhost || $1 == 127.* || $1 == ::1 ]]; }

tcp_open() {  # tcp_open HOST PORT: something accepts connections there
    # shellcheck disable=SC2016 # $1/$2 expand in the child bash, on purpose
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# nats_info HOST PORT: prints the server's INFO line; fails if no NATS server answers.
nats_info() {
    local line
    # shellcheck disable=SC2016 # $1/$2 expand in the child bash, on purpose
    line=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && IFS= read -r line <&3 && printf "%s" "$line"' \
        _ "$1" "$2" 2>/dev/null) || return 1
    [[ $line == INFO* ]] || return 1
    printf '%s\n' "$line"
}
nats_ready() { nats_info "$NATS_HOST" "$NATS_PORT" >/dev/null; }
nats_has_js() { nats_info "$NATS_HOST" "$NATS_PORT" | grep -q '"jetstream":true'; }

pg_bindir() {  # newest /usr/lib/postgresql/*/bin that has initdb
    local d
    d=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $d ]] && dirname "$d"
}

pg_tool() {  # pg_tool NAME: path of a Postgres client tool, from PATH or the server's bin dir
    local bindir
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    elif bindir=$(pg_bindir) && [[ -x $bindir/$1 ]]; then
        printf '%s\n' "$bindir/$1"
    else
        return 1
    fi
}

pg_ready() {  # accepting connections (pg_isready if installed, else a bare TCP check)
    local isready
    if isready=$(pg_tool pg_isready); then
        "$isready" -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -t 3
    else
        tcp_open "$PG_HOST" "$PG_PORT"
    fi
}

wait_for() {  # wait_for WHAT CHECK_FN
    local deadline=$((SECONDS + WAIT_SECS))
    until "$2"; do
        ((SECONDS < deadline)) || die "$1 did not answer within ${WAIT_SECS}s (see $STATE_DIR)"
        sleep 0.3
    done
}

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "need root for: $* (run it yourself, then retry)"
    else
        die "need root for: $* (run it yourself, then retry)"
    fi
}

# as_pg CMD...: run a Postgres server tool as a non-root user (initdb and postgres refuse root).
as_pg() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

docker_ok() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 &&
        docker compose version >/dev/null 2>&1
}

compose() {  # Docker wants an IP to bind, not a name
    local pg_bind=$PG_HOST nats_bind=$NATS_HOST
    [[ $pg_bind == localhost ]] && pg_bind=127.0.0.1
    [[ $nats_bind == localhost ]] && nats_bind=127.0.0.1
    DEEPNODE_PG_BIND=$pg_bind DEEPNODE_PG_PORT=$PG_PORT DEEPNODE_NATS_BIND=$nats_bind \
        DEEPNODE_NATS_PORT=$NATS_PORT POSTGRES_USER=$PG_USER POSTGRES_DB=$PG_DB \
        docker compose -f "$COMPOSE_FILE" "$@"
}

# apt_install PKG...: non-interactive install that neither starts the packages' own services nor
# creates Debian's default Postgres cluster (either would take our port with the wrong settings).
apt_install() {
    local policy=/usr/sbin/policy-rc.d made_policy=""
    log "installing $* with apt-get"
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        made_policy=1
    fi
    if [[ " $* " == *" postgresql "* && ! -e /etc/postgresql-common/createcluster.conf ]]; then
        as_root sh -c 'mkdir -p /etc/postgresql-common &&
            echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf'
    fi
    local rc=0
    {
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            as_root env DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get install -y -qq \
                -o Dpkg::Options::=--force-confold --no-install-recommends "$@"
    } </dev/null >"$STATE_DIR/apt.log" 2>&1 || rc=$?
    if [[ -n $made_policy ]]; then as_root rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install $* failed (log: $STATE_DIR/apt.log)"
    if [[ " $* " == *" nats-server "* && -d /run/systemd/system ]]; then
        as_root systemctl disable nats-server >/dev/null 2>&1 || true
    fi
}

ensure_binaries() {
    local need=()
    pg_bindir >/dev/null || need+=(postgresql)
    command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || need+=(nats-server)
    if ((${#need[@]})); then apt_install "${need[@]}"; fi
}

ensure_database() {  # create DATABASE_URL's database if it is missing (tests create their own)
    local psql createdb
    if ! psql=$(pg_tool psql) || ! createdb=$(pg_tool createdb); then
        log "psql not installed: not checking that database '$PG_DB' exists"
        return 0
    fi
    "$psql" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -qAtc 'select 1' >/dev/null 2>&1 && return 0
    "$createdb" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" "$PG_DB" 2>/dev/null ||
        "$psql" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -qAtc 'select 1' >/dev/null 2>&1 ||
        die "cannot connect to or create database '$PG_DB' at $PG_HOST:$PG_PORT as '$PG_USER'"
    log "created database '$PG_DB' at $PG_HOST:$PG_PORT"
}

start_local_pg() {
    local rec=$1 bindir data
    bindir=$(pg_bindir) || die "no initdb under /usr/lib/postgresql/*/bin"
    data=$(mktemp -d "${TMPDIR:-/tmp}/deepnode-pg-$PG_PORT.XXXXXX")
    if ((EUID == 0)); then chown postgres:postgres "$data"; fi
    chmod 700 "$data"
    printf 'local\n' >"$rec/mode"
    printf '%s\n' "$data" >"$rec/datadir"
    printf '%s\n' "$bindir" >"$rec/bindir"
    log "starting a throwaway PostgreSQL on $PG_HOST:$PG_PORT (data $data)"
    as_pg "$bindir/initdb" -D "$data" -U "$PG_USER" --auth=trust --no-locale -E UTF8 \
        >"$data.initdb.log" 2>&1 || die "initdb failed (log: $data.initdb.log)"
    as_pg sh -c "cat >> '$data/postgresql.conf'" <<EOF
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$data'
EOF
    as_pg "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t "$WAIT_SECS" start >/dev/null 9>&- ||
        die "postgres did not start on $PG_HOST:$PG_PORT (log: $data/server.log)"
}

start_local_nats() {
    local rec=$1 bin
    bin=$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)
    printf 'local\n' >"$rec/mode"
    log "starting a throwaway NATS with JetStream on $NATS_HOST:$NATS_PORT"
    setsid "$bin" -js -a "$NATS_HOST" -p "$NATS_PORT" -sd "$rec/jetstream" -P "$rec/nats.pid" \
        -l "$rec/nats.log" </dev/null >/dev/null 2>&1 9>&- &
}

stop_record() {  # stop_record DIR: stop what one record says `up` started, then forget it
    local rec=$1 kind mode pid i
    kind=$(basename "$rec")
    mode=$(cat "$rec/mode" 2>/dev/null || true)
    case "$kind:$mode" in
    pg-*:local)
        local data bindir
        data=$(cat "$rec/datadir")
        bindir=$(cat "$rec/bindir")
        # `pg_ctl status` is 0 only while that data dir's postmaster runs (not for a stale pid file).
        if [[ -d $data ]] && as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
            log "stopping throwaway PostgreSQL (${kind#pg-})"
            as_pg "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
                die "pg_ctl stop failed for $data (log: $data/server.log)"
        fi
        if [[ $data == "${TMPDIR:-/tmp}"/deepnode-pg-* ]]; then rm -rf "$data" "$data.initdb.log"; fi
        ;;
    nats-*:local)
        pid=$(cat "$rec/nats.pid" 2>/dev/null || true)
        # Only signal the pid if it is still the nats-server that `up` started with this store dir.
        if [[ -n $pid ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-sd $rec/jetstream"; then
            log "stopping throwaway NATS (${kind#nats-}, pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        fi
        ;;
    pg-*:docker | nats-*:docker)
        local svc=postgres
        [[ $kind == nats-* ]] && svc=nats
        log "stopping compose service $svc"
        docker compose -f "$COMPOSE_FILE" rm -sf "$svc" >/dev/null || die "docker compose rm -sf $svc failed"
        ;;
    esac
    rm -rf "$rec"
}

cmd_up() {
    local pg_rec=$STATE_DIR/pg-$PG_PORT nats_rec=$STATE_DIR/nats-$NATS_PORT missing=()
    if pg_ready; then
        log "PostgreSQL at $PG_HOST:$PG_PORT answers: reusing it"
    else
        [[ -d $pg_rec ]] && stop_record "$pg_rec"  # stale record (e.g. after a reboot)
        is_loopback "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT does not answer and is not local: start it or fix DATABASE_URL"
        missing+=(postgres)
    fi
    if nats_ready; then
        nats_has_js || die "NATS at $NATS_HOST:$NATS_PORT answers without JetStream: restart it with -js or fix NATS_URL"
        log "NATS at $NATS_HOST:$NATS_PORT answers: reusing it"
    else
        [[ -d $nats_rec ]] && stop_record "$nats_rec"
        is_loopback "$NATS_HOST" || die "NATS at $NATS_HOST:$NATS_PORT does not answer and is not local: start it or fix NATS_URL"
        missing+=(nats)
    fi

    if ((${#missing[@]})); then
        if docker_ok; then
            [[ " ${missing[*]} " == *" postgres "* ]] && mkdir -p "$pg_rec" && echo docker >"$pg_rec/mode"
            [[ " ${missing[*]} " == *" nats "* ]] && mkdir -p "$nats_rec" && echo docker >"$nats_rec/mode"
            log "starting ${missing[*]} with docker compose"
            compose up -d --wait "${missing[@]}" 9>&- || die "docker compose up -d --wait ${missing[*]} failed"
        else
            ensure_binaries
            # Installing may have started a server of the package's own (if policy-rc.d was ignored).
            if [[ " ${missing[*]} " == *" postgres "* ]]; then
                if pg_ready; then log "PostgreSQL at $PG_HOST:$PG_PORT answers now: reusing it"; else
                    mkdir -p "$pg_rec" && start_local_pg "$pg_rec"
                fi
            fi
            if [[ " ${missing[*]} " == *" nats "* ]]; then
                if nats_ready; then log "NATS at $NATS_HOST:$NATS_PORT answers now: reusing it"; else
                    mkdir -p "$nats_rec" && start_local_nats "$nats_rec"
                fi
            fi
        fi
        wait_for "PostgreSQL at $PG_HOST:$PG_PORT" pg_ready
        wait_for "NATS at $NATS_HOST:$NATS_PORT" nats_ready
        nats_has_js || die "NATS at $NATS_HOST:$NATS_PORT answers without JetStream"
    fi
    ensure_database
    log "ready: DATABASE_URL=$DATABASE_URL NATS_URL=$NATS_URL"
}

cmd_down() {
    local rec found=""
    for rec in "$STATE_DIR"/pg-* "$STATE_DIR"/nats-*; do
        [[ -d $rec ]] || continue
        found=1
        stop_record "$rec"
    done
    [[ -n $found ]] || log "nothing started by 'up' is recorded in $STATE_DIR: nothing to stop"
}

cmd_status() {
    local state rec
    state="not answering"
    if pg_ready; then state="answering"; fi
    rec=$STATE_DIR/pg-$PG_PORT
    if [[ -d $rec ]]; then state+=", started by up ($(cat "$rec/mode"))"; else state+=", not started by up"; fi
    log "PostgreSQL $PG_HOST:$PG_PORT: $state"
    state="not answering"
    if nats_has_js; then
        state="answering with JetStream"
    elif nats_ready; then
        state="answering WITHOUT JetStream"
    fi
    rec=$STATE_DIR/nats-$NATS_PORT
    if [[ -d $rec ]]; then state+=", started by up ($(cat "$rec/mode"))"; else state+=", not started by up"; fi
    log "NATS $NATS_HOST:$NATS_PORT: $state"
}

main() {
    local cmd=${1:-}
    case "$cmd" in
    up | down | status) ;;
    *) die "usage: $0 up|down|status" ;;
    esac
    mkdir -p "$STATE_DIR"
    # One `up`/`down` at a time per state dir (e.g. two test runs starting together). The servers
    # started below get fd 9 closed, so the lock ends with this script.
    if [[ $cmd != status ]]; then
        exec 9>"$STATE_DIR/.lock"
        flock -w "$((WAIT_SECS * 3))" 9 || die "another dev-services.sh holds $STATE_DIR/.lock"
    fi
    "cmd_$cmd"
}

main "$@"
