#!/bin/sh
# `pip "$@"` for the image build (installed as reidgen-pip by docker/Dockerfile). When the build
# has the `ca_bundle` secret (docker build --secret id=ca_bundle,src=FILE), pip trusts those
# certificates in addition to its own bundle: a copy of both in a temporary file that is removed
# when pip ends, so no layer keeps it. Without the secret: plain pip.
set -eu
secret="${CA_BUNDLE_SECRET:-/run/secrets/ca_bundle}"  # where BuildKit mounts the secret
if [ ! -s "$secret" ]; then
    exec python -m pip "$@"
fi
bundle="$(mktemp /tmp/ca-bundle.XXXXXX)"
trap 'rm -f "$bundle"' EXIT
# pip's own CA bundle (its vendored certifi), then the extra certificates.
cat "$(python -c 'from pip._vendor import certifi; print(certifi.where())')" "$secret" > "$bundle"
PIP_CERT="$bundle" python -m pip "$@"
