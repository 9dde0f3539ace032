#!/bin/sh
# A lab CA for the head's Redis over TLS, with the head's server certificate and one client
# certificate for the worker hosts (docs/scaling/index.md):
#
#   docker/make-ca.sh DIR NAME [NAME ...]
#
# NAME: every name and address the worker hosts use to reach the head (DNS names or IP
# addresses, e.g. head.lab.example 10.0.0.5); REDIS_URL's host must be one of them, since the
# workers check the name. Writes into DIR (made if missing; mode 700):
#
#   ca.crt                  the lab CA's certificate: on the head and on every worker host
#   ca.key                  the lab CA's key: only where certificates are made; no service needs it
#   redis-server.crt/.key   the head's Redis (docker-compose.head.yml)
#   redis-client.crt/.key   the worker hosts (docker-compose.worker.yml)
#
# A CA already in DIR is kept (run again with other NAMEs to renew the server certificate with
# the CA the hosts trust); the server and client certificates are made again each time. Keys are
# EC P-256, mode 600; the certificates last 825 days, the CA 10 years. Needs openssl (1.1.1+).
# The secrets are read by the containers' user (CONTAINER_UID in .env): as root, chown them to it.
set -eu

die() { echo "make-ca.sh: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 DIR NAME [NAME ...]   (NAME: the head's DNS names and IP addresses)"
command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
DIR=$1
shift

SAN=""
for name in "$@"; do
    case "$name" in
        *[!0-9.]*) case "$name" in *:*) kind=IP ;; *) kind=DNS ;; esac ;;  # IPv6 has colons
        *) kind=IP ;;
    esac
    SAN="${SAN:+$SAN,}$kind:$name"
done

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ -s "$DIR/ca.key" ] && [ -s "$DIR/ca.crt" ]; then
    echo "keeping the CA in $DIR ($(openssl x509 -noout -subject -in "$DIR/ca.crt"))"
else
    key "$DIR/ca.key"
    openssl req -x509 -new -key "$DIR/ca.key" -sha256 -days 3650 -subj "/O=reidgen lab/CN=reidgen lab CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$DIR/ca.crt"
    echo "made a lab CA in $DIR"
fi

# sign NAME CN EXTENSIONS: DIR/NAME.key and DIR/NAME.crt, signed by the CA.
sign() {
    key "$DIR/$1.key"
    openssl req -new -key "$DIR/$1.key" -subj "/O=reidgen lab/CN=$2" -out "$TMP/$1.csr"
    printf '%s\n' "$3" >"$TMP/$1.ext"
    openssl x509 -req -in "$TMP/$1.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -CAcreateserial \
        -CAserial "$TMP/ca.srl" -sha256 -days 825 -extfile "$TMP/$1.ext" -out "$DIR/$1.crt" 2>/dev/null
    openssl verify -CAfile "$DIR/ca.crt" "$DIR/$1.crt" >/dev/null
}
sign redis-server "$1" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN"
sign redis-client "reidgen worker" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
chmod 600 "$DIR"/*.key
chmod 644 "$DIR"/*.crt
echo "redis-server.crt for $SAN; redis-client.crt for the worker hosts"
