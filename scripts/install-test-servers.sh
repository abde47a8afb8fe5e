#!/usr/bin/env bash
# Machine-level pieces the loopback S3 test servers need (the kvstore/testing/servers/ package).
# Run by `make test`; idempotent, and quick when everything is already there.
#
#  * Ceph RGW: the Debian packages ceph-mon ceph-osd radosgw (a single-node memstore cluster is
#    started per test session, all state in a temp dir).
#  * Virtual-hosted addressing: BUCKET.localhost must resolve to loopback.  glibc does not do that
#    by default; libnss-myhostname does (RFC 6761: *.localhost is loopback), once `myhostname` is
#    on the hosts line of /etc/nsswitch.conf.  It goes right after `files`, so /etc/hosts still
#    decides `localhost` itself, and before `dns`, so *.localhost never reaches a resolver.
#
#    IPv6: nss-myhostname answers ::1 *before* 127.0.0.1 for *.localhost, while the test servers
#    listen on 127.0.0.1 only.  We leave that order alone (no /etc/gai.conf change: it would alter
#    address selection for every program on the machine) and do not pin bucket names in
#    /etc/hosts (tests use random bucket names).  Instead kvstore/testing/servers/ holds [::1]:PORT bound but
#    not listening for each server, so a connection to ::1 is refused immediately and clients
#    (urllib3/boto3, obstore/reqwest, awscrt) go on to 127.0.0.1 at no measurable cost.
#
#  * s3rver (npm, Node.js): an independent S3 implementation for the conformance matrix, installed
#    into the project-local .test-servers/ (git-ignored) with the machine's npm; Node.js and npm
#    come from Debian (nodejs npm) when missing and this runs as root.
#
# moto and SeaweedFS (weed) come from pip; the Makefile installs those, not this script.
# Not root, or not Debian/Ubuntu: print what was skipped and why, and exit 0 (the tests that need
# the missing pieces skip themselves and say why).
set -u

PKGS=(ceph-mon ceph-osd radosgw libnss-myhostname)
S3RVER_VERSION=3.7.1  # kvstore/testing/servers/s3rver.py S3RVER_VERSION
ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "install-test-servers: $*"; }

install_s3rver() {
    local dir="$ROOT/.test-servers" have
    if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing nodejs npm (for s3rver)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm \
                >>/tmp/install-test-servers.apt.log 2>&1 \
                || { apt-get update >>/tmp/install-test-servers.apt.log 2>&1 \
                     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm \
                        >>/tmp/install-test-servers.apt.log 2>&1; }
        fi
        if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
            say "skipped: s3rver needs node and npm (apt-get install nodejs npm); the s3rver tests will skip"
            return 0
        fi
    fi
    have=$(node -p "require('$dir/node_modules/s3rver/package.json').version" 2>/dev/null || true)
    if [ "$have" = "$S3RVER_VERSION" ]; then
        say "ok: s3rver $have in .test-servers/"
        return 0
    fi
    say "installing s3rver@$S3RVER_VERSION into .test-servers/ (npm)"
    mkdir -p "$dir"
    if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "s3rver@$S3RVER_VERSION" \
            >/tmp/install-test-servers.npm.log 2>&1; then
        say "warning: npm install s3rver@$S3RVER_VERSION failed (see /tmp/install-test-servers.npm.log); the s3rver tests will skip"
        tail -n 5 /tmp/install-test-servers.npm.log | sed 's/^/    /'
    fi
}

check_vhost() {
    if getent ahostsv4 kvstore-probe.localhost 2>/dev/null | grep -q '^127\.0\.0\.1'; then
        say "ok: *.localhost resolves to 127.0.0.1 ($(getent hosts kvstore-probe.localhost | awk '{print $1}' | paste -sd, -) via getent hosts)"
    else
        say "note: *.localhost does not resolve to 127.0.0.1; virtual-hosted tests will skip"
    fi
}

missing_pkgs() {
    local p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

if [ "$(uname -s)" != Linux ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null 2>&1 \
        || ! command -v dpkg-query >/dev/null 2>&1; then
    say "skipped: not a Debian/Ubuntu system; install Ceph (ceph-mon ceph-osd radosgw) and make *.localhost resolve to loopback yourself to run the Ceph and virtual-hosted tests"
    install_s3rver
    check_vhost
    exit 0
fi

mapfile -t MISSING < <(missing_pkgs)
if [ "${#MISSING[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "skipped: not root, so not installing ${MISSING[*]} (run as root: apt-get install -y --no-install-recommends ${MISSING[*]})"
    else
        say "installing ${MISSING[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y --no-install-recommends "${MISSING[@]}" >/tmp/install-test-servers.apt.log 2>&1; then
            # The package lists may be stale or absent: refresh once and try again.
            apt-get update >>/tmp/install-test-servers.apt.log 2>&1
            if ! apt-get install -y --no-install-recommends "${MISSING[@]}" >>/tmp/install-test-servers.apt.log 2>&1; then
                say "warning: apt-get install ${MISSING[*]} failed (see /tmp/install-test-servers.apt.log); those tests will skip"
                tail -n 5 /tmp/install-test-servers.apt.log | sed 's/^/    /'
            fi
        fi
    fi
else
    say "ok: ${PKGS[*]} installed"
fi

# nsswitch: make sure `myhostname` is on the hosts line (the package's postinst normally adds it,
# but not when the line was edited by hand or the package was installed earlier with it removed).
NSS=${KVSTORE_NSSWITCH_CONF:-/etc/nsswitch.conf}  # overridable for testing this script
if dpkg-query -W -f='${Status}' libnss-myhostname 2>/dev/null | grep -q 'install ok installed'; then
    if [ -f "$NSS" ] && grep -Eq '^hosts:.*[[:space:]]myhostname([[:space:]]|$)' "$NSS"; then
        :
    elif [ "$(id -u)" -ne 0 ]; then
        say "skipped: not root, so not adding 'myhostname' to the hosts line of $NSS"
    elif [ ! -f "$NSS" ] || ! grep -q '^hosts:' "$NSS"; then
        echo "hosts:          files myhostname dns" >>"$NSS"
        say "added a hosts line with myhostname to $NSS"
    else
        cp -p "$NSS" "$NSS.kvstore-bak"
        if grep -Eq '^hosts:.*[[:space:]]files([[:space:]]|$)' "$NSS"; then
            sed -i -E '/^hosts:/ s/([[:space:]])files([[:space:]]|$)/\1files myhostname\2/' "$NSS"
        else
            sed -i -E '/^hosts:/ s/^hosts:([[:space:]]*)/hosts:\1myhostname /' "$NSS"
        fi
        say "added 'myhostname' to the hosts line of $NSS (backup: $NSS.kvstore-bak): $(grep '^hosts:' "$NSS")"
    fi
fi

install_s3rver
check_vhost
exit 0
