#!/usr/bin/env bash
# End-to-end check of the Compose deployment on the local Docker engine (`make compose-e2e`): builds the
# images, trains a tiny DG-Net in the trainer container, starts redis, api and a worker, waits
# for their health checks, posts a swap with curl and the API key, runs a small batch job over
# HTTP and verifies its shards in the trainer, scales to 2 workers and kills one and restarts
# redis while a second job runs (it still completes: the lost worker's shard is redone when its
# lease runs out, queued ones survive in Redis's append-only file), trains a tiny re-id model on
# the shards, and tears everything down. Every step prints its time; the first failure stops the
# run (exit 1) after showing the services' logs. Loopback only; its containers, network and
# volumes are removed at the end, its folder too (the images stay, so a second run builds from
# the cache).
#
# Runs with docker-compose.yml + docker-compose.cpu.yml (no GPUs, the local Debian base), or with
# docker-compose.yml alone (E2E_GPU=1: the CUDA base and GPU reservations). Settings, all optional:
#   E2E_DATA        a Market-style data set to take a few identities from
#                   (default: $REIDGEN_DATA/market1501_mini, else ../shared/data/market1501_mini)
#   E2E_IDS         identities copied into the test data set (default 4)
#   CA_BUNDLE       extra CA certificates for pip in the build (the `ca_bundle` build secret);
#                   default /etc/ssl/certs/ca-certificates.crt when it exists, empty for none
#   E2E_CPUSET      pin every container to these CPUs (e.g. "1"), as `cpuset` in Compose
#   E2E_KEEP=1      keep the stack and the folder at the end (for a look); `down -v` is printed
#   E2E_TIMEOUT     seconds each wait may take (default 600)
#   E2E_GPU=1       use the GPU deployment (docker-compose.yml alone) instead of the CPU override
# Needs: docker (with BuildKit: the docker.io CLI, or buildx), Docker Compose v2.24 or later as
# `docker compose` (docker/README.md: how to install it), curl, python3. For the CPU override,
# the local base first: `docker/local-base.sh` (make local-base).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
T0=$(date +%s.%N)
TIMEOUT="${E2E_TIMEOUT:-600}"
PROJECT="reidgen-e2e-$$"
WORK=""
STEP=""

elapsed() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):7.1f}')" "$1"; }
step() {
    [ -z "$STEP" ] || echo "[e2e $(elapsed "$T0") s] ok   $STEP ($(elapsed "$T_STEP") s)"
    STEP="$1"; T_STEP=$(date +%s.%N)
    echo "[e2e $(elapsed "$T0") s] ---- $STEP"
}
die() { echo "[e2e $(elapsed "$T0") s] FAIL $STEP: $*" >&2; exit 1; }

# -- tools ---------------------------------------------------------------------------------------
for tool in docker curl python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running? are you in the docker group?)"
# Builds need BuildKit (the build secret): Docker's CLI from 23 on has it only with the buildx
# plugin; the CLI of Debian's docker.io (20.10) has it built in.
DOCKER_BUILD="${DOCKER_BUILD:-docker}"
if ! "$DOCKER_BUILD" buildx version >/dev/null 2>&1; then
    major=$("$DOCKER_BUILD" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ "${major:-0}" -ge 23 ] 2>/dev/null; then
        if [ -x /usr/bin/docker ] && [ "$(/usr/bin/docker version --format '{{.Client.Version}}' | cut -d. -f1)" -lt 23 ]; then
            DOCKER_BUILD=/usr/bin/docker   # docker.io's CLI next to a newer one without buildx
        else
            die "docker $major.x builds with BuildKit only through the buildx plugin, which is missing"
        fi
    fi
fi
COMPOSE_VERSION="$(docker compose version --short 2>/dev/null || true)"
python3 - "$COMPOSE_VERSION" <<'EOF' || die "needs Docker Compose v2.24+ as 'docker compose' (found '${COMPOSE_VERSION:-none}'); docker/README.md says how to install it"
import re, sys
m = re.match(r"v?(\d+)\.(\d+)", sys.argv[1])
sys.exit(0 if m and (int(m[1]), int(m[2])) >= (2, 24) else 1)
EOF

if [ "${E2E_GPU:-0}" = 1 ]; then
    FILES=(-f docker-compose.yml)
else
    FILES=(-f docker-compose.yml -f docker-compose.cpu.yml)
    BASE="${LOCAL_BASE_IMAGE:-reidgen-base:bookworm}"
    docker image inspect "$BASE" >/dev/null 2>&1 \
        || die "no local base image $BASE: build it first, as root, with docker/local-base.sh (make local-base)"
fi

# -- the folder of this run: data, models, runs, shards, secrets ------------------------------------
step "prepare a test folder"
WORK="$(mktemp -d /tmp/reidgen-e2e.XXXXXX)"
compose() { docker compose -p "$PROJECT" --env-file "$WORK/e2e.env" "${FILES[@]}" -f "$WORK/e2e.override.yml" "$@"; }
logs() { compose logs --no-color --tail 40 2>&1 | sed 's/^/    | /' >&2 || true; }
cleanup() {
    rc=$?
    [ $rc -eq 0 ] || [ -z "$WORK" ] || [ ! -f "$WORK/e2e.override.yml" ] || logs
    if [ -n "$WORK" ] && [ "${E2E_KEEP:-0}" = 1 ]; then
        echo "[e2e] kept: docker compose -p $PROJECT --env-file $WORK/e2e.env ${FILES[*]} -f $WORK/e2e.override.yml down -v; rm -rf $WORK"
    elif [ -n "$WORK" ]; then
        echo "[e2e $(elapsed "$T0") s] ---- tear down"
        [ ! -f "$WORK/e2e.override.yml" ] \
            || compose --profile trainer --profile flower down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
        rm -rf "$WORK"
    fi
    [ $rc -ne 0 ] || echo "[e2e $(elapsed "$T0") s] PASSED"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DATA_SRC="${E2E_DATA:-${REIDGEN_DATA:-$REPO/../shared/data}/market1501_mini}"
[ -d "$DATA_SRC/bounding_box_train" ] || die "no Market-style data set at $DATA_SRC (set E2E_DATA)"
mkdir -p "$WORK"/{data/market1501,models,mask-models,runs,shards,secrets}
# A few identities with all their images, real copies (symlinks would not resolve in a container).
python3 - "$DATA_SRC" "$WORK/data/market1501" "${E2E_IDS:-4}" <<'EOF' || die "could not copy the test data"
import shutil, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ids = sorted({p.name.split("_")[0] for p in (src / "bounding_box_train").glob("*.jpg")} - {"-1", "0000"})[:n]
for split in ("bounding_box_train", "query", "bounding_box_test"):
    (dst / split).mkdir(parents=True)
    for p in sorted((src / split).glob("*.jpg")):
        if p.name.split("_")[0] in ids:
            shutil.copy(p, dst / split / p.name)
print(f"    {len(ids)} identities, {sum(1 for _ in dst.rglob('*.jpg'))} images from {src}")
EOF
key() { python3 -c "import secrets; print(secrets.token_urlsafe(32))"; }
key > "$WORK/secrets/api_key"
key > "$WORK/secrets/redis_password"
echo "admin:$(key)" > "$WORK/secrets/flower_basic_auth"
chmod 600 "$WORK"/secrets/*
# The containers run as the owner of the folders: you, or uid 1000 when you are root.
if [ "$(id -u)" = 0 ]; then RUN_UID=1000 RUN_GID=1000; chown -R 1000:1000 "$WORK"; else RUN_UID=$(id -u) RUN_GID=$(id -g); fi
chmod 700 "$WORK/secrets"
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
cat > "$WORK/e2e.env" <<EOF
HOST_DATA_DIR=$WORK/data
HOST_MODELS_DIR=$WORK/models
HOST_MASK_MODELS_DIR=$WORK/mask-models
HOST_RUNS_DIR=$WORK/runs
HOST_SHARDS_DIR=$WORK/shards
CONTAINER_UID=$RUN_UID
CONTAINER_GID=$RUN_GID
API_KEY_FILE=$WORK/secrets/api_key
API_PORT=$PORT
FLOWER_PORT=0
IMAGE_TAG=${IMAGE_TAG:-latest}
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-reidgen-base:bookworm}
EOF
# This run's secrets instead of ./secrets/, the api on loopback only, and the optional CPU pinning.
{
    echo "services:"
    for svc in redis api worker trainer flower; do
        echo "  $svc:"
        [ -z "${E2E_CPUSET:-}" ] || echo "    cpuset: \"$E2E_CPUSET\""
        [ "$svc" != api ] || echo "    ports: !override [\"127.0.0.1:$PORT:8000\"]"
        [ "$svc" != flower ] || echo "    ports: !override [\"127.0.0.1:0:5555\"]"
    done
    echo "secrets:"
    for s in api_key redis_password flower_basic_auth; do echo "  $s: {file: $WORK/secrets/$s}"; done
} > "$WORK/e2e.override.yml"
compose config --quiet || die "docker compose config rejects the files"

# -- build -----------------------------------------------------------------------------------------
step "build the images"
CA="${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
SECRET=()
if [ -n "$CA" ]; then
    [ -s "$CA" ] || die "CA_BUNDLE=$CA is not a readable file"
    SECRET=(--secret "id=ca_bundle,src=$CA")
fi
TAG="${IMAGE_TAG:-latest}"
ARGS=()
[ "${E2E_GPU:-0}" = 1 ] || ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "REDIS_BASE_IMAGE=$BASE")
# docker build (not compose build): the same BuildKit on every Compose version, the secret given once.
build() {
    local target=$1 image=$2 t
    t=$(date +%s.%N)
    DOCKER_BUILDKIT=1 "$DOCKER_BUILD" build -q -f docker/Dockerfile --target "$target" -t "$image" "${ARGS[@]}" "${SECRET[@]}" . >/dev/null \
        || die "docker build --target $target failed (run it without -q to see why)"
    echo "    $image: $(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}') in $(elapsed "$t") s"
}
build reidgen "reidgen:$TAG"
[ "${E2E_GPU:-0}" = 1 ] || build redis "reidgen-redis:$TAG"

# -- a tiny DG-Net, trained in the trainer container -----------------------------------------------------
step "train a tiny teacher and DG-Net in the trainer"
compose run --rm -T trainer train-reid --preset tiny --data market1501 --epochs 1 --workers 0 --no-eval \
    --out /runs/teacher >"$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log" >&2; die "train-reid failed"; }
compose run --rm -T trainer train-dgnet --data market1501 --teacher /runs/teacher --out /runs/dgnet \
    --backbone small_cnn --pretrained none --workers 0 --batch-size 4 --iterations 2 --grid-every 0 \
    --checkpoint-every 10000 --quality-every 0 >>"$WORK/train.log" 2>&1 \
    || { tail -20 "$WORK/train.log" >&2; die "train-dgnet failed"; }
[ -d "$WORK/runs/dgnet" ] || die "the trainer wrote no runs/dgnet on the host (bind mount)"
owner=$(stat -c %u "$WORK/runs/dgnet")
[ "$owner" = "$RUN_UID" ] || die "runs/dgnet belongs to uid $owner on the host, not $RUN_UID"
cp -a "$WORK/runs/dgnet" "$WORK/models/dgnet"

# -- start and wait for health -----------------------------------------------------------------------
step "start redis, api and a worker; wait until healthy"
compose up -d --no-build --wait --wait-timeout "$TIMEOUT" redis api worker || die "the services did not turn healthy"
compose ps --format '    {{.Service}}: {{.Status}}' 2>/dev/null || compose ps
URL="http://127.0.0.1:$PORT"
KEY="$(cat "$WORK/secrets/api_key")"

# POST /v1/jobs of SUBSET source images × 4 structures (64 records a shard: the server's minimum);
# prints the job id.
submit() {
    local out=$1 subset=$2 reply code
    reply=$(curl -sS --max-time 60 -w '\n%{http_code}' -H "X-API-Key: $KEY" -H "Content-Type: application/json" \
        "$URL/v1/jobs" -d '{"spec": {"kind": "dgnet_random_structures", "checkpoint": "/models/dgnet",
            "data": "market1501", "structures_per_image": 4, "subset": '"$subset"', "shard_size": 64,
            "batch_size": 16, "seed": 0}, "out": "'"$out"'"}') || die "POST /v1/jobs failed"
    code=$(tail -n1 <<<"$reply")
    [ "$code" = 202 ] || die "POST /v1/jobs answered $code: $(head -n -1 <<<"$reply")"
    python3 -c "import json, sys; print(json.loads(sys.argv[1])['id'])" "$(head -n -1 <<<"$reply")"
}
# "STATE SHARDS_DONE SHARDS_TOTAL" of a job.
job_state() {
    local status
    status=$(curl -fsS --max-time 30 -H "X-API-Key: $KEY" "$URL/v1/jobs/$1") || return 1
    python3 -c "import json, sys; j = json.loads(sys.argv[1]); print(j['state'], j['shards_done'], j['shards_total'])" "$status"
}
# Wait until a job is done; a failed or cancelled job, or the time limit, stops the run.
follow() {
    local deadline=$(( $(date +%s) + TIMEOUT )) state
    while :; do
        state=$(job_state "$1") || die "GET /v1/jobs/$1 failed"
        case "$state" in
            done*) echo "    job $1: $state"; return 0 ;;
            failed*|cancelled*) die "job $1 ended: $state ($(curl -sS -H "X-API-Key: $KEY" "$URL/v1/jobs/$1"))" ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || die "job $1 not done after $TIMEOUT s: $state"
        sleep 1
    done
}

# -- a swap over HTTP ----------------------------------------------------------------------------------
step "POST /v1/swap with curl and the API key; check the PNG"
mapfile -t IMGS < <(ls "$WORK"/data/market1501/bounding_box_train/*.jpg | sed -n '1p;$p')
code=$(curl -s -o /dev/null -w '%{http_code}' -F "appearance=@${IMGS[0]}" -F "structure=@${IMGS[1]}" "$URL/v1/swap")
[ "$code" = 401 ] || die "a swap without the API key answered $code, not 401"
curl -fsS --max-time 120 -H "X-API-Key: $KEY" -F "appearance=@${IMGS[0]}" -F "structure=@${IMGS[1]}" \
    -F format=png "$URL/v1/swap" -o "$WORK/swap.png" || die "the swap failed"
python3 - "$WORK/swap.png" <<'EOF' || die "the swap is not the expected PNG"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (64, 128), f"{w}x{h}, expected 64x128 (the small preset's size)"
print(f"    swap.png: {w}x{h}, {len(data)} bytes")
EOF

# -- a batch job over HTTP, shards verified in the trainer -----------------------------------------------
step "POST /v1/jobs, follow it to done, shards verify in the trainer"
JOB=$(submit "/shards/e2e" 32)
follow "$JOB"
compose run --rm -T trainer shards verify /shards/e2e | sed 's/^/    /' || die "shards verify failed"
n=$(find "$WORK/shards/e2e" -maxdepth 1 -name 'shard-*' -type d | wc -l)
[ "$n" = 2 ] || die "expected 2 shard folders (128 records, 64 a shard) on the host, found $n"
owner=$(stat -c %u "$WORK/shards/e2e")
[ "$owner" = "$RUN_UID" ] || die "the shards belong to uid $owner on the host, not $RUN_UID"

# -- 2 workers, one killed mid-job; redis restarted mid-job -------------------------------------------
step "scale to 2 workers; kill one mid-job; restart redis mid-job; the job completes"
compose up -d --no-build --wait --wait-timeout "$TIMEOUT" --scale worker=2 worker >/dev/null 2>&1 \
    || die "the second worker did not turn healthy"
[ "$(compose ps -q worker | wc -l)" = 2 ] || die "expected 2 worker containers"
JOB2=$(submit "/shards/e2e-robust" 64)   # 256 records: 4 shards
deadline=$(( $(date +%s) + TIMEOUT ))
until [ "$(job_state "$JOB2" | cut -d' ' -f1)" = running ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "job $JOB2 never started"
    sleep 0.5
done
victim=$(compose ps -q worker | tail -n1)
# Kill it once it holds a shard (Celery logs "received" when it takes one).
until docker logs "$victim" 2>&1 | grep -q 'generate_shard\[.*\] received'; do
    [ "$(date +%s)" -lt "$deadline" ] || die "worker ${victim:0:12} never took a shard"
    sleep 0.2
done
docker kill "$victim" >/dev/null || die "could not kill worker container $victim"
taken=$(docker logs "$victim" 2>&1 | grep -c 'generate_shard\[.*\] received' || true)
finished=$(docker logs "$victim" 2>&1 | grep -c 'generate_shard\[.*\] succeeded' || true)
held=$((taken - finished))
echo "    killed worker ${victim:0:12} holding $held unfinished shard(s); job $(job_state "$JOB2")"
# The queue and the unacknowledged shards as Redis holds them, before and after a restart.
queue() {
    compose exec -T redis sh -c 'export REDISCLI_AUTH="$(cat /run/secrets/redis_password)";
        echo "queued $(redis-cli llen reidgen:reidgen-shards), unacknowledged $(redis-cli hlen reidgen:unacked)"'
}
before=$(queue) || die "could not read the queue from redis"
compose restart redis >/dev/null 2>&1 || die "could not restart redis"
compose up -d --no-build --wait --wait-timeout "$TIMEOUT" redis >/dev/null 2>&1 || die "redis did not turn healthy again"
after=$(queue) || die "could not read the queue from redis after the restart"
echo "    redis restarted: before $before; after $after"
[ "$before" = "$after" ] || echo "    (the surviving worker took or finished shards meanwhile)"
follow "$JOB2"
# The killed worker's shard was redone (its lease ran out; the watchdog queued it again).
redone=$(curl -fsS -H "X-API-Key: $KEY" "$URL/v1/jobs/$JOB2" | python3 -c "import json, sys; print(json.load(sys.stdin)['shards_redone'])")
echo "    shards_redone: $redone"
[ "$held" -eq 0 ] || [ "$redone" -ge 1 ] || die "the killed worker's shard was not redone (shards_redone $redone)"
compose run --rm -T trainer shards verify /shards/e2e-robust | sed 's/^/    /' || die "shards verify failed"

# -- train on the shards ------------------------------------------------------------------------------
step "train a tiny re-id model on the shards (docker compose run --rm trainer)"
compose run --rm -T trainer train-reid --preset tiny --data market1501 --shards /shards/e2e --epochs 1 \
    --workers 0 --no-eval --out /runs/reid-shards >>"$WORK/train.log" 2>&1 \
    || { tail -20 "$WORK/train.log" >&2; die "train-reid --shards failed"; }
ls "$WORK"/runs/reid-shards/checkpoints/*.pt >/dev/null 2>&1 || die "no checkpoint in runs/reid-shards/checkpoints"

step "done"
STEP=""
