# Shared by docker/e2e.sh and docker/cluster_e2e.sh (sourced, after E2E_TAG is set): timed steps,
# the first failure ending the run, and the tool checks both make before touching Docker.
T0=$(date +%s.%N)
STEP=""

elapsed() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):7.1f}')" "$1"; }
step() {
    [ -z "$STEP" ] || echo "[$E2E_TAG $(elapsed "$T0") s] ok   $STEP ($(elapsed "$T_STEP") s)"
    STEP="$1"; T_STEP=$(date +%s.%N)
    echo "[$E2E_TAG $(elapsed "$T0") s] ---- $STEP"
}
die() { echo "[$E2E_TAG $(elapsed "$T0") s] FAIL $STEP: $*" >&2; exit 1; }

# require_tools TOOL...: each installed, the engine answering, Compose v2.24+ (docs/deployment.md, step 0).
require_tools() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
    docker info >/dev/null 2>&1 \
        || die "the Docker engine does not answer (is dockerd running? are you in the docker group?)"
    local version
    version="$(docker compose version --short 2>/dev/null || true)"
    python3 - "$version" <<'PY' || die "needs Docker Compose v2.24+ as 'docker compose' (found '${version:-none}'); docs/deployment.md, step 0 installs it"
import re, sys
m = re.match(r"v?(\d+)\.(\d+)", sys.argv[1])
sys.exit(0 if m and (int(m[1]), int(m[2])) >= (2, 24) else 1)
PY
}
