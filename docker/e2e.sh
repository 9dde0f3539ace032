#!/usr/bin/env bash
# `make compose-e2e`: the deployment page (docs/deployment.md), steps 1 to 8, run for real on the
# local Docker engine as a reader runs it, in a throw-away copy of the repository.
#
# The commands are the page's own: the ```bash blocks marked `<!-- e2e: NAME -->`, extracted by
# docker/page_blocks.py and run as written in this shell, in the page's order (tests/test_deploy.py
# checks that the `run_block` lines below name exactly those blocks, in that order). Between them,
# checks of what a reader would look at; after the page's step 7, a worker killed while it holds a
# shard and a redis restart with shards queued (the job still completes). After the page's last
# block (`down -v`) nothing of the run may be left: no container, network or volume. Every step
# prints its time; the first failure stops the run (exit 1) after showing the services' logs.
#
# The run's environment is the only difference from a reader's: its own Compose project
# (COMPOSE_PROJECT_NAME), the api published on 127.0.0.1:8000 only (API_PORT), REIDGEN_DATA the
# data folder; the other variables .env sets are unset, so that .env decides, as on the page.
# Settings, all optional:
#   E2E_DATA     the folder of the data sets, holding market1501_mini/ (default: $REIDGEN_DATA,
#                else ../shared/data beside the checkout)
#   E2E_KEEP=1   keep the stack and the folder at the end (for a look); how to remove them is printed
#   E2E_TIMEOUT  seconds each wait of the e2e's own checks may take (default 600)
# Needs: Docker with Compose v2.24 or later as `docker compose` (the page's step 0), the local base
# image or root (the page's step 3 makes it), curl, python3, git; ports 8000 and 5555 free.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${E2E_TIMEOUT:-600}"
WORK=""
BLOCK_LOG=""

E2E_TAG=e2e
# shellcheck source=docker/steps.sh
. "$REPO/docker/steps.sh"

# -- tools, free ports, data ------------------------------------------------------------------------
require_tools docker curl python3 git
for port in 8000 5555; do
    python3 -c "import socket, sys; socket.socket().bind(('0.0.0.0', int(sys.argv[1])))" "$port" 2>/dev/null \
        || die "port $port is in use: the page's commands use 8000 (api) and 5555 (Flower)"
done
DATA="$(realpath -e "${E2E_DATA:-${REIDGEN_DATA:-$REPO/../shared/data}}" 2>/dev/null)" \
    || die "no data folder (set E2E_DATA to the folder that holds market1501_mini/)"
[ -d "$DATA/market1501_mini/bounding_box_train" ] || die "no market1501_mini in $DATA (set E2E_DATA)"

# -- the run's environment ------------------------------------------------------------------------------
unset COMPOSE_FILE COMPOSE_PROFILES TORCH_INDEX_URL LOCAL_BASE_IMAGE CA_BUNDLE IMAGE_TAG FLOWER_PORT \
    API_KEY_FILE CONTAINER_UID CONTAINER_GID HOST_DATA_DIR HOST_MODELS_DIR HOST_MASK_MODELS_DIR \
    HOST_RUNS_DIR HOST_SHARDS_DIR
export COMPOSE_PROJECT_NAME="reidgen-e2e-$$"
export API_PORT=127.0.0.1:8000
export REIDGEN_DATA="$DATA"
URL=http://127.0.0.1:8000

cleanup() {
    rc=$?
    if [ $rc -ne 0 ] && [ -n "$BLOCK_LOG" ] && [ -s "$BLOCK_LOG" ]; then
        echo "[e2e $(elapsed "$T0") s] FAIL $STEP; the block's last output:" >&2
        tail -n 30 "$BLOCK_LOG" | sed 's/^/    > /' >&2
    fi
    if [ $rc -ne 0 ] && [ -n "$WORK" ] && [ -f "$WORK/reidgen/.env" ]; then
        (cd "$WORK/reidgen" && docker compose --profile trainer --profile flower logs --no-color --tail 40 2>&1 \
            | sed 's/^/    | /' >&2) || true
    fi
    if [ -n "$WORK" ] && [ "${E2E_KEEP:-0}" = 1 ]; then
        echo "[e2e] kept: cd $WORK/reidgen && COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME API_PORT=$API_PORT" \
             "docker compose --profile trainer --profile flower down -v; rm -rf $WORK"
    elif [ -n "$WORK" ]; then
        echo "[e2e $(elapsed "$T0") s] ---- tear down"
        if [ -f "$WORK/reidgen/.env" ]; then
            (cd "$WORK/reidgen" && docker compose --profile trainer --profile flower down -v --remove-orphans \
                --timeout 20 >/dev/null 2>&1) || true
        fi
        cd / && rm -rf "$WORK"
    fi
    [ $rc -ne 0 ] || echo "[e2e $(elapsed "$T0") s] PASSED"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- a copy of the repository: the working tree, tracked and untracked, without what git ignores ---------
step "copy the repository into a throw-away folder"
WORK="$(mktemp -d /tmp/reidgen-e2e.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/reidgen" "$WORK/logs"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | python3 -c '
import os, shutil, sys
src, dst, n = sys.argv[1], sys.argv[2], 0
for rel in sys.stdin.buffer.read().decode().split("\0"):
    if rel and os.path.lexists(os.path.join(src, rel)):   # a tracked file deleted in the tree is left out
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel), follow_symlinks=False)
        n += 1
print(f"    {n} files; data sets from {sys.argv[3]}")' "$REPO" "$WORK/reidgen" "$DATA" || die "could not copy the repository"
cd "$WORK/reidgen"
PAGE=docs/deployment.md
python3 docker/page_blocks.py "$PAGE" >/dev/null || die "docker/page_blocks.py cannot read $PAGE"

# Run the page's block NAME in this shell, as it is written (its variables stay for the next
# blocks); its commands are printed first, its output goes to a log whose last lines are shown.
run_block() {
    local name=$1 code
    step "page: $name"
    code="$(python3 docker/page_blocks.py "$PAGE" "$name")" || die "no block '$name' on the page"
    sed 's/^/    $ /' <<<"$code"
    BLOCK_LOG="$WORK/logs/$name.log"
    { eval "$code"; } >"$BLOCK_LOG" 2>&1 </dev/null
    tail -n "${2:-4}" "$BLOCK_LOG" | sed 's/^/    > /'
    BLOCK_LOG=""
}
env_value() { sed -n "s/^$1=//p" .env | tail -n1; }
# "STATE SHARDS_DONE SHARDS_TOTAL SHARDS_REDONE" of a job.
job_state() {
    curl -fsS --max-time 30 -H "X-API-Key: $(cat secrets/api_key)" "$URL/v1/jobs/$1" | python3 -c '
import json, sys; j = json.load(sys.stdin); print(j["state"], j["shards_done"], j["shards_total"], j["shards_redone"])'
}

# -- the page, steps 1 to 8 ---------------------------------------------------------------------------
run_block settings
[ "$(env_value COMPOSE_FILE)" = docker-compose.yml:docker-compose.cpu.yml ] || die ".env names other compose files"
echo "    TORCH_INDEX_URL=$(env_value TORCH_INDEX_URL)   (empty: PyTorch from the package index)"

run_block folders-and-secrets
RUN_UID="$(env_value CONTAINER_UID)"
for s in api_key redis_password flower_basic_auth; do [ -s "secrets/$s" ] || die "secrets/$s is empty"; done

run_block data
[ "$(env_value HOST_DATA_DIR)" = "$DATA" ] || die "HOST_DATA_DIR is $(env_value HOST_DATA_DIR), not $DATA"

run_block build
for image in reidgen:latest reidgen-flower:latest reidgen-redis:latest; do
    echo "    $image: $(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"
done

run_block models
[ -d models/dgnet ] || die "no models/dgnet"
owner=$(stat -c %u runs/dgnet)
[ "$owner" = "$RUN_UID" ] || die "runs/dgnet belongs to uid $owner on the host, not $RUN_UID"

run_block start 8
[ "$(docker compose ps -q worker | wc -l)" = 2 ] || die "expected 2 worker containers"
for c in $(docker compose ps -q); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$c")
    [ "$health" = healthy ] || die "container ${c:0:12} is $health"
done

run_block swap-and-job 3
python3 - swap.png <<'EOF' || die "the swap is not the expected PNG"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (64, 128), f"{w}x{h}, expected 64x128 (the small preset's size)"
print(f"    swap.png: {w}x{h}, {len(data)} bytes")
EOF
code=$(curl -s -o /dev/null -w '%{http_code}' -F appearance=@a.jpg -F structure=@b.jpg "$URL/v1/swap")
[ "$code" = 401 ] || die "a swap without the API key answered $code, not 401"
[ -n "${JOB:-}" ] || die "the page's block set no JOB"

run_block watch
state=$(job_state "$JOB") || die "GET /v1/jobs/$JOB failed"
echo "    job $JOB: $state"
[ "$(cut -d' ' -f1-3 <<<"$state")" = "done 4 4" ] || die "the job is not done with 4 of 4 shards: $state"
[ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:5555/)" = 401 ] || die "Flower answers without its login"
[ "$(curl -s -o /dev/null -w '%{http_code}' -u "$(cat secrets/flower_basic_auth)" http://127.0.0.1:5555/)" = 200 ] \
    || die "Flower refuses the login of secrets/flower_basic_auth"
echo "    Flower: 401 without the login, 200 with it"
owner=$(stat -c %u shards/mini-dgnet-k4)
[ "$owner" = "$RUN_UID" ] || die "the shards belong to uid $owner on the host, not $RUN_UID"

# -- beyond the page: a worker killed holding a shard, redis restarted with shards queued ------------------
step "a second job; kill one of the 2 workers holding a shard; restart redis; the job completes"
reply=$(curl -fsS --max-time 60 -H "X-API-Key: $KEY" -H "Content-Type: application/json" "$URL/v1/jobs" -d '{
    "spec": {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "market1501_mini",
             "subset": 64, "structures_per_image": 4, "shard_size": 64, "batch_size": 16, "seed": 1},
    "out": "e2e-robust"}') || die "POST /v1/jobs failed"
JOB2=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['id'])" "$reply")
deadline=$(( $(date +%s) + TIMEOUT ))
until [ "$(job_state "$JOB2" | cut -d' ' -f1)" = running ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "job $JOB2 never started"
    sleep 0.5
done
victim=$(docker compose ps -q worker | tail -n1)
# Kill it once it holds a shard (Celery logs "received" when it takes one, "succeeded" when done).
until [ "$(docker logs "$victim" 2>&1 | grep -c 'generate_shard\[.*\] received')" -gt \
        "$(docker logs "$victim" 2>&1 | grep -c 'generate_shard\[.*\] succeeded')" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "worker ${victim:0:12} never took a shard"
    sleep 0.2
done
docker kill "$victim" >/dev/null || die "could not kill worker container $victim"
echo "    killed worker ${victim:0:12} holding a shard; job $(job_state "$JOB2")"
queue() {
    docker compose exec -T redis sh -c 'export REDISCLI_AUTH="$(cat /run/secrets/redis_password)";
        echo "queued $(redis-cli llen reidgen:reidgen-shards), unacknowledged $(redis-cli hlen reidgen:unacked)"'
}
before=$(queue) || die "could not read the queue from redis"
docker compose restart redis >/dev/null 2>&1 || die "could not restart redis"
docker compose up -d --no-build --wait --wait-timeout "$TIMEOUT" redis >/dev/null 2>&1 || die "redis did not turn healthy again"
after=$(queue) || die "could not read the queue from redis after the restart"
echo "    redis restarted: before $before; after $after"
while :; do
    state=$(job_state "$JOB2") || die "GET /v1/jobs/$JOB2 failed"
    case "$state" in
        done*) break ;;
        failed*|cancelled*) die "job $JOB2 ended: $state" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || die "job $JOB2 not done after $TIMEOUT s: $state"
    sleep 1
done
echo "    job $JOB2: $state (state, shards done, total, redone)"
[ "$(cut -d' ' -f4 <<<"$state")" -ge 1 ] || die "the killed worker's shard was not redone"
docker compose run --rm -T trainer shards verify /shards/e2e-robust 2>&1 | sed 's/^/    /' || die "shards verify failed"

run_block train-on-shards
ls runs/reid-shards/checkpoints/*.pt >/dev/null 2>&1 || die "no checkpoint in runs/reid-shards/checkpoints"

run_block stop
left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"; \
       docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"; \
       docker volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
[ -z "$left" ] || die "left after the page's 'down -v': $(tr '\n' ' ' <<<"$left")"
echo "    no container, network or volume of $COMPOSE_PROJECT_NAME is left"

step "done"
STEP=""
