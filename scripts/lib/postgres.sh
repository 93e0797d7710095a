# shellcheck shell=bash
# PostgreSQL discovery shared by scripts/test, scripts/bench and scripts/with-postgres.
#
# find_postgres sets DATABASE_URL to a server whose database can create and drop test
# databases, trying in order:
#   1. DATABASE_URL, if set;
#   2. a server on 127.0.0.1:${ARBITER_PG_PORT:-5432} that lets user postgres log in
#      without a password (tried with `psql -w`: a server that asks for one, as Debian's
#      own cluster does over TCP, is passed over, never waited at);
#   3. a throwaway cluster under target/pg (or, where the postgres account cannot reach
#      the checkout, as under /root, a directory of its own under /var/tmp), made with the
#      local initdb/pg_ctl, started on a free port and stopped when the calling script
#      exits; where no initdb is found and the script runs as root on a Debian-like system,
#      it first installs the server from the distribution (`apt-get install postgresql`);
#   4. otherwise it fails, naming what to install.
# ARBITER_PG_PORT exists so the fallback can be exercised while a server runs on 5432.
# Every psql here and in the scripts runs with -w: nothing ever waits at a password prompt.

pg_bin() {
    # Debian keeps the server binaries off PATH.
    local name=$1 dir
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin /opt/homebrew/bin; do
        if [ -x "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
    done
    return 1
}

server_answers() {
    local host=$1 port=$2
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$host" -p "$port" -U postgres -t 2
    else
        # No client tools: a TCP connect is the best we can do.
        timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
    fi
}

# Whether user postgres logs in to the server on host:port without a password.
server_lets_us_in() {
    local host=$1 port=$2
    if command -v psql >/dev/null 2>&1; then
        PGCONNECT_TIMEOUT=2 psql -w -q -X -h "$host" -p "$port" -U postgres -d postgres \
            -c 'select 1' >/dev/null 2>&1
    else
        server_answers "$host" "$port"
    fi
}

stop_throwaway_cluster() {
    if [ -n "${ARBITER_PG_DATA:-}" ] && [ -f "$ARBITER_PG_DATA/postmaster.pid" ]; then
        echo "postgres: stopping the throwaway cluster in $ARBITER_PG_DATA" >&2
        as_pg_user "$(pg_bin pg_ctl)" -D "$ARBITER_PG_DATA" -m fast -w stop >/dev/null || true
    fi
}

as_pg_user() {
    # initdb and postgres refuse to run as root; run them as the postgres account then.
    if [ "$(id -u)" = 0 ]; then
        # From /: the postgres account may not be allowed into the working directory.
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Installs PostgreSQL's server from the distribution, where that is possible: as root, with
# apt-get. Debian's package starts a cluster of its own on 5432; the throwaway cluster
# below is used all the same, so the scripts behave alike wherever they run.
install_postgres_server() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    echo "postgres: no server binaries found; installing them (apt-get install postgresql)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

# The directory the throwaway cluster lives in: target/pg where the postgres account can
# reach it, else (a checkout under /root, mode 0700) one of its own per checkout.
throwaway_cluster_root() {
    local root
    root="$(pwd)/target/pg"
    if [ "$(id -u)" != 0 ]; then echo "$root"; return 0; fi
    mkdir -p "$root" && chown postgres "$root"
    if runuser -u postgres -- test -w "$root" 2>/dev/null; then echo "$root"; return 0; fi
    root="/var/tmp/arbiter-pg-$(pwd | cksum | cut -d' ' -f1)"
    mkdir -p "$root" && chown postgres "$root" && chmod 700 "$root"
    echo "postgres: the postgres account cannot reach $(pwd)/target/pg; the cluster lives in $root" >&2
    echo "$root"
}

# The last lines of a log, on stderr, under a heading.
show_log_tail() {
    echo "postgres: $1, the end of $2:" >&2
    tail -n 20 "$2" 2>/dev/null | sed 's/^/    /' >&2
}

start_throwaway_cluster() {
    local initdb pg_ctl root port
    pg_bin initdb >/dev/null || install_postgres_server || return 1
    initdb=$(pg_bin initdb) && pg_ctl=$(pg_bin pg_ctl) || return 1
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        echo "postgres: running as root without a 'postgres' account to run initdb as" >&2
        return 1
    fi
    root=$(throwaway_cluster_root) || return 1
    ARBITER_PG_DATA="$root/data"
    mkdir -p "$root"
    if [ ! -f "$ARBITER_PG_DATA/PG_VERSION" ]; then
        as_pg_user "$initdb" -D "$ARBITER_PG_DATA" -U postgres --auth=trust -E UTF8 >"$root/initdb.log" 2>&1 || {
            show_log_tail "initdb failed" "$root/initdb.log"; return 1; }
    fi
    # A port nobody listens on, from a range unlikely to be in use.
    for port in $(seq 55432 55482); do
        server_answers 127.0.0.1 "$port" || break
    done
    as_pg_user "$pg_ctl" -D "$ARBITER_PG_DATA" -l "$root/server.log" -w -t 30 \
        -o "-p $port -k $root -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null || {
        show_log_tail "the throwaway cluster did not start" "$root/server.log"; return 1; }
    # Not exported: only this script stops the cluster, never a child that inherits the URL.
    trap stop_throwaway_cluster EXIT
    DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "postgres: started a throwaway cluster on port $port (data in $ARBITER_PG_DATA)" >&2
}

find_postgres() {
    local port=${ARBITER_PG_PORT:-5432}
    if [ -n "${DATABASE_URL:-}" ]; then
        echo "postgres: using DATABASE_URL" >&2
    elif server_lets_us_in 127.0.0.1 "$port"; then
        DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
        echo "postgres: using the server on 127.0.0.1:$port" >&2
    else
        if server_answers 127.0.0.1 "$port"; then
            echo "postgres: the server on 127.0.0.1:$port does not let user postgres in without a password; using a throwaway cluster instead (set DATABASE_URL to use that server)" >&2
        fi
        if ! start_throwaway_cluster; then
            cat >&2 <<'MSG'
postgres: no PostgreSQL found. Either
  - set DATABASE_URL to a server where this user may create databases, or
  - run a server on 127.0.0.1:5432 that lets user postgres in without a password, or
  - install PostgreSQL's server binaries (initdb, pg_ctl), e.g. `apt-get install postgresql`
    (done for you when running as root where apt-get exists), and this script starts a
    throwaway cluster under target/pg.
MSG
            return 1
        fi
    fi
    export DATABASE_URL
}

# database_url_for NAME: DATABASE_URL with its database replaced by NAME (query kept).
database_url_for() {
    local base=${DATABASE_URL%%\?*}
    local query=${DATABASE_URL#"$base"}
    echo "${base%/*}/$1$query"
}
