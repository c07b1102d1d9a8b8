#!/usr/bin/env bash
# Shared set-up helpers for scripts/test and .ci/run. Source this file, do not
# execute it:
#
#   . scripts/lib/setup.sh
#   ensure_build_deps        # C toolchain + OpenSSL headers for openssl-sys
#   ensure_smtp_test_server  # Python with aiosmtpd, for the tests' SMTP server
#   ensure_ops_tools         # promtool, prometheus and systemd-analyze, for the operations tests
#   ensure_packaging_tools   # cargo-deb and dpkg-deb, for scripts/package
#   ensure_lintian           # lintian, for scripts/check-package
#   ensure_standardwebhooks  # PyPI standardwebhooks, the tests' signature verifier
#   ensure_previous_release  # the previous release's daemon, for the upgrade test
#   ensure_postgres          # exports DATABASE_URL pointing at a live server
#
# Call ensure_postgres in the shell that runs the tests, not in a subshell such
# as $(...): a private cluster is stopped by an EXIT trap of that shell.
# Works on a bare Debian machine (root) by installing packages with apt-get.
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "${0##*/}: this file is a library; source it instead of running it" >&2
    exit 2
fi

_outboxd_log() { echo "outboxd-setup: $*" >&2; }


# apt-get install with no prompts (CI has no stdin). Root runs apt directly;
# other users go through non-interactive sudo if there is one.
_outboxd_apt_install() {
    local -a sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            _outboxd_log "need to install $* but not root and no sudo; install them by hand"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        _outboxd_log "need to install $* but apt-get is missing (not Debian?); install them by hand"
        return 1
    fi
    _outboxd_log "installing with apt-get: $*"
    # apt output goes to stderr so that our stdout stays clean for callers.
    # Once per run: exported so a child script (.ci/run -> scripts/test)
    # skips it too. Deliberately not named OUTBOXD_*: outboxd reads every
    # OUTBOXD_* variable as configuration and rejects unknown keys.
    if [[ -z "${_OUTBOXD_SETUP_APT_UPDATED:-}" ]]; then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        export _OUTBOXD_SETUP_APT_UPDATED=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >&2
}

# The project links openssl-sys (via native-tls), which needs a C compiler,
# pkg-config and the OpenSSL headers at build time.
ensure_build_deps() {
    if command -v cc >/dev/null 2>&1 &&
        command -v pkg-config >/dev/null 2>&1 &&
        [[ -e /usr/include/openssl/ssl.h ]]; then
        return 0
    fi
    _outboxd_apt_install build-essential pkg-config libssl-dev
}

# "host:port" of a postgres:// URL for log lines. Never prints the user-info
# part (may hold a password) nor the query string (may hold password=...).
_outboxd_pg_hostport() {
    local url=$1 rest safe='^[][A-Za-z0-9._:,%-]+$'
    if [[ "$url" != *://* ]]; then
        echo "(non-URL connection string)"
        return
    fi
    rest=${url#*://}
    rest=${rest##*@}     # drop user[:password]@ (up to the last @)
    rest=${rest%%[/?#]*} # drop /dbname?params
    if [[ -z "$rest" ]]; then
        echo "(socket or host given in URL parameters)"
    elif [[ "$rest" =~ $safe ]]; then
        # No explicit port -> libpq's default.
        if [[ ! "$rest" =~ :[0-9]+$ && "$rest" != *,* ]]; then
            rest+=":5432"
        fi
        echo "$rest"
    else
        echo "(host hidden)"
    fi
}

# True if a server answers at DATABASE_URL. -w: never prompt for a password
# (CI has no stdin); -X: ignore ~/.psqlrc; bounded connect time so an
# unroutable host cannot hang the run.
_outboxd_pg_answers() {
    local out
    out=$(PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}" \
        psql "$DATABASE_URL" -X -w -Atqc 'select 1' 2>/dev/null) || return 1
    [[ "$out" == 1 ]]
}

# Highest installed PostgreSQL major version's bin directory, or nothing.
_outboxd_pg_bindir() {
    local d
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V | tail -n 1)
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
        echo "$d"
    fi
}

# State of the private cluster, used by the EXIT trap.
_OUTBOXD_PG_DIR=""
_OUTBOXD_PG_BIN=""
_OUTBOXD_PG_PORT=""

# initdb/pg_ctl refuse to run as root, so as root run them as the postgres
# OS user. cd / first: the caller's cwd may be unreadable for that user.
_outboxd_pg_run() {
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

_outboxd_pg_cleanup() {
    local dir=$_OUTBOXD_PG_DIR
    [[ -n "$dir" ]] || return 0
    _OUTBOXD_PG_DIR=""
    if [[ -f "$dir/postmaster.pid" ]]; then
        _outboxd_pg_run "$_OUTBOXD_PG_BIN/pg_ctl" stop -D "$dir" -m fast -w -t 30 >/dev/null 2>&1 ||
            _outboxd_pg_run "$_OUTBOXD_PG_BIN/pg_ctl" stop -D "$dir" -m immediate -w -t 30 >/dev/null 2>&1 ||
            _outboxd_log "warning: could not stop private PostgreSQL in $dir"
    fi
    rm -rf -- "$dir" || true
}

# Start a throw-away cluster on a free 127.0.0.1 port; sets DATABASE_URL.
_outboxd_pg_start_private() {
    local bin tmpbase dir port attempt out
    bin=$(_outboxd_pg_bindir)
    if [[ -z "$bin" ]]; then
        _outboxd_apt_install postgresql
        bin=$(_outboxd_pg_bindir)
        [[ -n "$bin" ]] || {
            _outboxd_log "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
            return 1
        }
    fi

    if ((EUID == 0)) && ! id -u postgres >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    fi

    # The data dir must be reachable by the postgres user; a private TMPDIR
    # (e.g. under /root) is not, so fall back to /tmp then.
    tmpbase=${TMPDIR:-/tmp}
    if ((EUID == 0)) && ! runuser -u postgres -- test -x "$tmpbase" 2>/dev/null; then
        tmpbase=/tmp
    fi
    dir=$(mktemp -d "$tmpbase/outboxd-pg.XXXXXX")
    # Register cleanup before anything can fail half-way.
    _OUTBOXD_PG_DIR=$dir
    _OUTBOXD_PG_BIN=$bin
    _outboxd_pg_add_exit_trap
    if ((EUID == 0)); then
        chown postgres: "$dir"
    fi

    # C.UTF-8 always exists on Debian; the caller's LANG may name a locale
    # that is not generated, which would make initdb fail.
    out=$(_outboxd_pg_run "$bin/initdb" -D "$dir" --auth=trust -U postgres \
        -E UTF8 --locale=C.UTF-8 2>&1) || {
        _outboxd_log "initdb failed:"
        echo "$out" >&2
        return 1
    }

    # Probe from 55432 upward for a port nobody listens on. Another run may
    # grab the same port between probe and bind, so on a failed start move
    # on to the next port.
    port=55432
    for ((attempt = 1; attempt <= 50; attempt++)); do
        while (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
            port=$((port + 1))
            ((port < 65535)) || {
                _outboxd_log "no free TCP port found"
                return 1
            }
        done
        # The log lives inside the data dir (removed with it); the
        # postmaster must not inherit our stdout/stderr or pipes would hang.
        # Fresh log per attempt so the bind check below sees only this one.
        rm -f "$dir/postgres.log"
        if _outboxd_pg_run "$bin/pg_ctl" start -D "$dir" -w -t 60 \
            -l "$dir/postgres.log" \
            -o "-c listen_addresses=127.0.0.1 -p $port -k '$dir' -c fsync=off -c max_connections=200" \
            >/dev/null 2>&1 </dev/null; then
            _OUTBOXD_PG_PORT=$port
            export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
            return 0
        fi
        if ! grep -qi 'could not bind\|address already in use\|could not create any TCP/IP sockets' \
            "$dir/postgres.log" 2>/dev/null; then
            _outboxd_log "private PostgreSQL failed to start; its log:"
            cat "$dir/postgres.log" >&2 2>/dev/null || true
            return 1
        fi
        _outboxd_log "port $port was taken meanwhile (attempt $attempt), trying the next one"
        port=$((port + 1))
    done
    _outboxd_log "private PostgreSQL failed to start: no usable port"
    return 1
}

# Add our cleanup in front of any EXIT trap the caller already has.
_outboxd_pg_add_exit_trap() {
    local prev
    local -a cur=()
    # `trap -p EXIT` prints: trap -- 'command' EXIT (shell-quoted)
    eval "cur=($(trap -p EXIT))"
    prev=${cur[2]:-}
    [[ "$prev" == *_outboxd_pg_cleanup* ]] && return 0
    if [[ -z "$prev" ]]; then
        trap _outboxd_pg_cleanup EXIT
    else
        # Hand the exit status on to the old trap; set +e so that the
        # non-zero `(exit ...)` does not abort the trap before it runs.
        # shellcheck disable=SC2064,SC2154 # expand $prev now, on purpose
        trap "_outboxd_pg_rc=\$?; _outboxd_pg_cleanup; set +e; (exit \$_outboxd_pg_rc); $prev" EXIT
    fi
}

# Make DATABASE_URL point at a PostgreSQL server, starting a private one if
# nothing answers there.
ensure_postgres() {
    export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    local wanted
    wanted=$(_outboxd_pg_hostport "$DATABASE_URL")

    if ! command -v psql >/dev/null 2>&1; then
        # Debian's package brings psql and the server binaries we may need.
        _outboxd_apt_install postgresql
        hash -r
    fi
    if command -v psql >/dev/null 2>&1 && _outboxd_pg_answers; then
        _outboxd_log "using PostgreSQL at $wanted (DATABASE_URL)"
        return 0
    fi

    _outboxd_pg_start_private
    _outboxd_log "nothing usable at $wanted; using private PostgreSQL at 127.0.0.1:$_OUTBOXD_PG_PORT (data in $_OUTBOXD_PG_DIR, removed on exit)"
}

# The integration tests run a real SMTP server: tests/smtp/server.py on
# Debian's Python with aiosmtpd (package python3-aiosmtpd).
ensure_smtp_test_server() {
    if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
        return 0
    fi
    _outboxd_apt_install python3 python3-aiosmtpd
}

# The operations tests check the exposition and the alert rules with promtool,
# run the rules in a real Prometheus server scraping a daemon (both from
# Debian's package prometheus; the test starts its own server on a free
# port), and check the unit files with systemd-analyze.
ensure_ops_tools() {
    local -a missing=()
    if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
        missing+=(prometheus)
    fi
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    ((${#missing[@]} == 0)) || _outboxd_apt_install "${missing[@]}"
}

# What scripts/package uses: cargo-deb, which builds the .deb (from
# crates.io with `cargo install` into ~/.cargo/bin, a few minutes on 2 cores,
# only when missing), dpkg-deb, and objcopy and strip (binutils, part of
# build-essential), with which cargo-deb splits the debug info off.
ensure_packaging_tools() {
    local -a missing=()
    command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
    command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
    ((${#missing[@]} == 0)) || _outboxd_apt_install "${missing[@]}"
    if ! cargo deb --version >/dev/null 2>&1; then
        _outboxd_log "installing cargo-deb from crates.io with cargo install (a few minutes, once)"
        cargo install cargo-deb --locked --version "^3"
    fi
}

# Debian's lintian (about 120 packages with its dependencies), which only
# scripts/check-package runs on what scripts/package built.
ensure_lintian() {
    command -v lintian >/dev/null 2>&1 || _outboxd_apt_install lintian
}

# A Python with the standardwebhooks package from PyPI, the independent
# verifier of signed requests in the tests (tests/webhooks/verifier.py), in
# a virtual environment of its own; exports STANDARDWEBHOOKS_PYTHON.
ensure_standardwebhooks() {
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/outboxd/test-venv"
    if ! "$venv/bin/python" -c 'import standardwebhooks' >/dev/null 2>&1; then
        _outboxd_log "installing standardwebhooks from PyPI into $venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            _outboxd_apt_install python3-venv
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'standardwebhooks==1.1.0'
    fi
    export STANDARDWEBHOOKS_PYTHON="$venv/bin/python"
}

# The daemon of the release before this one's schema changes, for the
# upgrade test (tests/it/upgrade.rs: a daemon of the previous release keeps
# delivering while `outboxd migrate` upgrades its schema). The release is
# the commit named in tests/previous-release, taken from this clone's git
# history and built once into target/previous/<commit>/; exports
# PREVIOUS_OUTBOXD. Its binary is renamed while built so that it shares the
# compiled dependencies in target/ without replacing target/debug/outboxd.
ensure_previous_release() {
    local commit out src target="${CARGO_TARGET_DIR:-$PWD/target}"
    commit=$(tr -d '[:space:]' < tests/previous-release)
    out="$target/previous/$commit/outboxd"
    if [[ ! -x "$out" ]]; then
        if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
            _outboxd_log "the previous release $commit (tests/previous-release) is not in this clone's history; the upgrade test needs it: git fetch --unshallow"
            return 1
        fi
        _outboxd_log "building the previous release ${commit:0:12} for the upgrade test (about a minute, once)"
        src=$(mktemp -d)
        git archive "$commit" | tar -x -C "$src"
        mv "$src/src/main.rs" "$src/src/bin/outboxd-previous.rs"
        sed -i '/^default-run *=/d' "$src/Cargo.toml"
        cargo build --locked --manifest-path "$src/Cargo.toml" \
            --target-dir "$target" --bin outboxd-previous
        mkdir -p "${out%/*}"
        cp "$target/debug/outboxd-previous" "$out"
        rm -rf "$src"
    fi
    export PREVIOUS_OUTBOXD="$out"
}
