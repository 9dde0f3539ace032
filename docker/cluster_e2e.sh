#!/usr/bin/env bash
# `make cluster-e2e`: a cluster of two hosts run for real on one Docker engine (docs/scaling/index.md).
#
# The head is the deployment of docs/deployment.md with docker-compose.head.yml on top (Redis's TLS
# port published, its plain port not); "host 2" is a second Compose project, `host2`, of
# docker-compose.worker.yml: workers only, on a Docker network of their own, reaching the head only
# through its published TLS port (at the address of Docker's bridge on this machine, as a lab's
# worker reaches the head's address), with the secrets a worker host gets. Both mount the same
# shards, models and data folders, as hosts of a lab mount one shared file system. In order:
#
#   1. the head's files, a lab CA (docker/make-ca.sh), the images, a tiny teacher and DG-Net;
#   2. the head (2 workers) and host 2 (2 workers); the head publishes the api and the TLS port
#      only, host 2 cannot reach the head's containers but through that port;
#   3. refused: a remote worker without the password, without TLS (plain text on the TLS port,
#      and the unpublished plain port), without a client certificate; taken: the one with all;
#   4. a job of 12 shards over both hosts; once host 2 has written a shard and holds another,
#      `docker compose -p host2 kill`; the head's workers finish it: the manifests name workers
#      of both hosts, `shards verify` finds every planned record once, none lost or doubled;
#   5. host 2 back (workers stopped), and two trainer containers, one per project, train
#      `train-reid` on the shards as two nodes (torchrun --nnodes 2, c10d rendezvous, gloo);
#   6. both projects down -v: no container, network or volume of either is left.
#
# Every step prints its time; the first failure stops the run (exit 1) with the services' logs.
# Settings, all optional: E2E_DATA (the folder holding market1501_mini/; default $REIDGEN_DATA, else
# ../shared/data beside the checkout), E2E_KEEP=1 (keep both stacks and the folder), E2E_TIMEOUT
# (seconds each wait may take, default 900). Needs: Docker with Compose v2.24+ as `docker compose`,
# openssl, curl, python3, git; ports 8000 (loopback), 6380 (Docker's bridge address) and 29400
# (the rendezvous, loopback) free; no Compose project named host2.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${E2E_TIMEOUT:-900}"
WORK=""
HOST2=host2
JOB_OUT=cluster-job
SHARDS=12

E2E_TAG=cluster-e2e
# shellcheck source=docker/steps.sh
. "$REPO/docker/steps.sh"
say() { echo "    $*"; }

# -- tools, free ports, data ------------------------------------------------------------------------
require_tools docker curl python3 git openssl
# The head's address as host 2 sees it: Docker's default bridge on this machine (a lab: the head's name).
# (Docker 20.10 leaves the gateway out of the default bridge's IPAM: the subnet's first address.)
GW="$(docker network inspect bridge --format '{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}' 2>/dev/null \
      | python3 -c 'import ipaddress, sys; w = sys.stdin.read().split()
print(w[0] if len(w) > 1 else next(ipaddress.ip_network(w[0]).hosts()))')" && [ -n "$GW" ] \
    || die "no address of the default Docker bridge network"
for where in 127.0.0.1:8000 "$GW:6380" 127.0.0.1:29400; do
    python3 -c "import socket, sys; h, p = sys.argv[1].rsplit(':', 1); socket.socket().bind((h, int(p)))" "$where" \
        2>/dev/null || die "$where is in use"
done
[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$HOST2")" ] \
    || die "a Compose project named $HOST2 exists already (docker compose -p $HOST2 down -v)"
DATA="$(realpath -e "${E2E_DATA:-${REIDGEN_DATA:-$REPO/../shared/data}}" 2>/dev/null)" \
    || die "no data folder (set E2E_DATA to the folder that holds market1501_mini/)"
[ -d "$DATA/market1501_mini/bounding_box_train" ] || die "no market1501_mini in $DATA (set E2E_DATA)"

# -- the environment: what the files and .env decide, and the run's own project, ports -----------------
unset COMPOSE_FILE COMPOSE_PROFILES TORCH_INDEX_URL LOCAL_BASE_IMAGE CA_BUNDLE IMAGE_TAG FLOWER_PORT \
    API_KEY_FILE CONTAINER_UID CONTAINER_GID HOST_DATA_DIR HOST_MODELS_DIR HOST_MASK_MODELS_DIR \
    HOST_RUNS_DIR HOST_SHARDS_DIR HEAD_HOST HEAD_REDIS_TLS_PORT REDIS_TLS_PORT
export COMPOSE_PROJECT_NAME="reidgen-head-$$"
export API_PORT=127.0.0.1:8000
export REDIS_TLS_PORT="$GW:6380"
URL=http://127.0.0.1:8000
if [ "$(id -u)" = 0 ]; then U=1000 G=1000; else U=$(id -u) G=$(id -g); fi

h2() { docker compose -p "$HOST2" -f docker-compose.worker.yml -f docker-compose.worker.cpu.yml \
           --env-file host2.env "$@"; }
logs() {
    (cd "$WORK/reidgen" && docker compose --profile trainer logs --no-color --tail 30 2>&1 | sed 's/^/    | /' >&2
     h2 --profile trainer logs --no-color --tail 30 2>&1 | sed 's/^/    2| /' >&2) || true
}
cleanup() {
    rc=$?
    if [ $rc -ne 0 ] && [ -n "$WORK" ] && [ -f "$WORK/reidgen/host2.env" ]; then logs; fi
    if [ -n "$WORK" ] && [ "${E2E_KEEP:-0}" = 1 ]; then
        echo "[cluster-e2e] kept: cd $WORK/reidgen; COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME docker compose" \
             "--profile trainer down -v; docker compose -p $HOST2 down -v; rm -rf $WORK"
    elif [ -n "$WORK" ]; then
        echo "[cluster-e2e $(elapsed "$T0") s] ---- tear down"
        if [ -f "$WORK/reidgen/host2.env" ]; then
            (cd "$WORK/reidgen" && h2 --profile trainer down -v --remove-orphans --timeout 10 >/dev/null 2>&1) || true
        fi
        if [ -f "$WORK/reidgen/.env" ]; then
            (cd "$WORK/reidgen" && docker compose --profile trainer --profile flower down -v --remove-orphans \
                --timeout 10 >/dev/null 2>&1) || true
        fi
        cd / && rm -rf "$WORK"
    fi
    [ $rc -ne 0 ] || echo "[cluster-e2e $(elapsed "$T0") s] PASSED"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# "STATE SHARDS_DONE SHARDS_TOTAL SHARDS_REDONE RECORDS_DONE" of a job.
job_state() {
    curl -fsS --max-time 30 -H "X-API-Key: $(cat secrets/api_key)" "$URL/v1/jobs/$1" | python3 -c '
import json, sys; j = json.load(sys.stdin)
print(j["state"], j["shards_done"], j["shards_total"], j["shards_redone"], j["records_done"])'
}
# How many shards a worker container has taken and finished (Celery's log lines).
taken() { docker logs "$1" 2>&1 | grep -c 'generate_shard\[.*\] received' || true; }
finished() { docker logs "$1" 2>&1 | grep -c 'generate_shard\[.*\] succeeded' || true; }

# -- 1. the head's files, the lab CA, the images, the models ------------------------------------------
step "copy the repository into a throw-away folder"
WORK="$(mktemp -d /tmp/reidgen-cluster.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/reidgen"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | python3 -c '
import os, shutil, sys
src, dst, n = sys.argv[1], sys.argv[2], 0
for rel in sys.stdin.buffer.read().decode().split("\0"):
    if rel and os.path.lexists(os.path.join(src, rel)):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel), follow_symlinks=False)
        n += 1
print(f"    {n} files")' "$REPO" "$WORK/reidgen" || die "could not copy the repository"
cd "$WORK/reidgen"

step "settings, secrets and the lab CA (head: $GW)"
cp .env.example .env
sed -i "s/^CONTAINER_UID=.*/CONTAINER_UID=$U/; s/^CONTAINER_GID=.*/CONTAINER_GID=$G/; s|^HOST_DATA_DIR=.*|HOST_DATA_DIR=$DATA|" .env
echo 'COMPOSE_FILE=docker-compose.yml:docker-compose.cpu.yml:docker-compose.head.yml' >> .env
if curl -fs --max-time 20 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
    echo 'TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu' >> .env
fi
mkdir -p models mask-models runs shards secrets && chmod 700 secrets
for s in api_key redis_password; do
    python3 -c "import secrets; print(secrets.token_urlsafe(32))" > "secrets/$s"
done
python3 -c "import secrets; print('admin:' + secrets.token_urlsafe(24))" > secrets/flower_basic_auth
docker/make-ca.sh secrets/tls "$GW" | sed 's/^/    /'
chmod 600 secrets/api_key secrets/redis_password secrets/flower_basic_auth
[ "$(id -u)" != 0 ] || chown -R "$U:$G" models runs shards secrets
# Host 2's settings: its own file, as on another machine; the same shared folders and secrets.
cat > host2.env <<EOF
HEAD_HOST=$GW
HEAD_REDIS_TLS_PORT=6380
HOST_DATA_DIR=$DATA
HOST_MODELS_DIR=$PWD/models
HOST_SHARDS_DIR=$PWD/shards
HOST_MASK_MODELS_DIR=$PWD/mask-models
HOST_RUNS_DIR=$PWD/runs
CONTAINER_UID=$U
CONTAINER_GID=$G
EOF
docker compose config -q || die "the head's compose files do not load"
h2 config -q || die "host 2's compose files do not load"

step "images (the local base when missing, then the build; cached after docs/deployment.md's run)"
docker image inspect reidgen-base:bookworm >/dev/null 2>&1 || docker/local-base.sh
docker compose build 2>&1 | tail -n 3 | sed 's/^/    /'
docker image inspect reidgen:latest reidgen-redis:latest >/dev/null || die "images missing after the build"

step "a tiny teacher and DG-Net (trainer on the head)"
docker compose run --rm -T trainer train-reid --preset tiny --epochs 1 --workers 0 --no-eval \
    --data market1501_mini --out /runs/teacher > "$WORK/models.log" 2>&1 || { tail "$WORK/models.log"; die "teacher"; }
docker compose run --rm -T trainer train-dgnet --backbone small_cnn --pretrained none --iterations 2 \
    --batch-size 4 --workers 0 --grid-every 0 --quality-every 0 \
    --data market1501_mini --teacher /runs/teacher --out /runs/dgnet >> "$WORK/models.log" 2>&1 \
    || { tail "$WORK/models.log"; die "DG-Net"; }
cp -r runs/dgnet models/dgnet

# -- 2. the two hosts ---------------------------------------------------------------------------------
step "the head: redis (TLS port published), api, 2 workers"
docker compose up -d --wait --wait-timeout "$TIMEOUT" --scale worker=2 2>&1 | tail -n 2 | sed 's/^/    /' \
    || die "the head did not turn healthy"
ports=$(docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --format '{{.Ports}}' \
        | tr ',' '\n' | grep -o '[0-9.:]*->[0-9]*/tcp' | sort -u | tr '\n' ' ')
say "published: $ports"
[ "$ports" = "127.0.0.1:8000->8000/tcp $GW:6380->6380/tcp " ] || die "the head publishes other ports: $ports"

step "host 2: its own project and network, 2 workers over TLS"
h2 up -d --no-build --wait --wait-timeout "$TIMEOUT" --scale worker=2 2>&1 | tail -n 2 | sed 's/^/    /' \
    || die "host 2's workers did not turn healthy (their health probe pings them through the head's Redis)"
H2_WORKERS=$(h2 ps -q worker)
[ "$(wc -l <<<"$H2_WORKERS")" = 2 ] || die "expected 2 workers on host 2"
one=$(head -n1 <<<"$H2_WORKERS")
nets=$(docker inspect --format '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$one")
say "host 2's worker is on: $nets"
[ "$nets" = "${HOST2}_default " ] || die "host 2's worker is on other networks: $nets"
REDIS_IP=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
           "$(docker compose ps -q redis)")
docker exec -i "$one" python - "$REDIS_IP" <<'EOF' || die "host 2 reaches the head's containers directly"
import socket, sys
try:
    socket.gethostbyname("redis")
    sys.exit("the name redis resolves on host 2")
except OSError:
    pass
try:
    socket.create_connection((sys.argv[1], 6379), timeout=5).close()
    sys.exit(f"host 2 connects to the head's redis container at {sys.argv[1]}:6379")
except OSError as exc:
    print(f"    host 2: no name 'redis'; the redis container {sys.argv[1]}:6379 unreachable ({exc})")
EOF

# -- 3. who Redis lets in -------------------------------------------------------------------------------
step "a remote worker without the password, without TLS or without a certificate is refused"
# What a worker does when it starts: the Celery broker connection, then a job-store call; from a
# container on host 2's network, with the worker host's settings less what the case takes away.
PROBE='
import sys
try:
    import redis
    from worker.celery_app import make_app, redis_url
    with make_app().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=15)
    redis.Redis.from_url(redis_url(), socket_connect_timeout=15, socket_timeout=15).ping()
except Exception as exc:
    message = " ".join(str(exc).split())[:160]
    print(f"refused: {type(exc).__name__}: {message}")
    sys.exit(3)
print("connected")'
probe() {  # probe EXPECTED NAME [docker compose run -e ...]
    local expected=$1 name=$2 out rc
    shift 2
    set +e
    out=$(h2 run --rm -T --no-deps --entrypoint python "$@" worker -c "$PROBE" 2>&1 \
          | grep -E '^(refused: |connected$)' | tail -n 1)
    rc=$?
    set -e
    say "$name: $out"
    case "$expected" in
        connected) [ "$out" = connected ] || die "$name: not connected" ;;
        refused) [[ "$out" == refused:* ]] || die "$name: not refused" ;;
    esac
}
probe connected "the worker host's settings"
probe refused "no password" -e REDIS_PASSWORD_FILE=
probe refused "no TLS (plain text to the TLS port)" -e REDIS_URL="redis://$GW:6380/0" \
    -e REDIS_CA_FILE= -e REDIS_CERT_FILE= -e REDIS_KEY_FILE=
probe refused "no TLS (the plain port, not published)" -e REDIS_URL="redis://$GW:6379/0" \
    -e REDIS_CA_FILE= -e REDIS_CERT_FILE= -e REDIS_KEY_FILE=
probe refused "TLS without a client certificate" -e REDIS_CERT_FILE= -e REDIS_KEY_FILE=

# -- 4. a job over both hosts; host 2 killed mid-job -------------------------------------------------------
step "a job of $SHARDS shards over both hosts; kill host 2 once it has written one and holds another"
KEY=$(cat secrets/api_key)
reply=$(curl -fsS --max-time 120 -H "X-API-Key: $KEY" -H "Content-Type: application/json" "$URL/v1/jobs" -d '{
    "spec": {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "market1501_mini",
             "subset": '$((SHARDS * 16))', "structures_per_image": 4, "shard_size": 64, "batch_size": 16,
             "seed": 26},
    "out": "'$JOB_OUT'"}') || die "POST /v1/jobs failed"
JOB=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['id'])" "$reply")
say "job $JOB: $(job_state "$JOB")"
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    done2=0 holding=0
    for c in $H2_WORKERS; do
        t=$(taken "$c"); f=$(finished "$c")
        done2=$(( done2 + f )); [ "$t" -le "$f" ] || holding=$(( holding + 1 ))
    done
    [ "$done2" -ge 1 ] && [ "$holding" -ge 1 ] && break
    state=$(job_state "$JOB") || die "GET /v1/jobs/$JOB failed"
    [ "${state%% *}" = running ] || [ "${state%% *}" = queued ] \
        || die "the job ended before host 2 held a second shard ($state); run again"
    [ "$(date +%s)" -lt "$deadline" ] || die "host 2 never wrote a shard: $state"
    sleep 0.5
done
h2 kill 2>&1 | tail -n 1 | sed 's/^/    /'
say "killed host 2 ($done2 shard(s) written there, $holding held); job $(job_state "$JOB")"
while :; do
    state=$(job_state "$JOB") || die "GET /v1/jobs/$JOB failed"
    case "$state" in
        done*) break ;;
        failed*|cancelled*) die "job $JOB ended: $state" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || die "job $JOB not done after $TIMEOUT s: $state"
    sleep 1
done
say "job $JOB: $state (state, shards done, total, redone, records)"
read -r _ sd st sr rd <<<"$state"
[ "$sd" = "$SHARDS" ] && [ "$st" = "$SHARDS" ] || die "shards done/total: $sd/$st, expected $SHARDS"
[ "$sr" -ge 1 ] || die "no shard was redone after host 2 was killed"
[ "$rd" = $((SHARDS * 64)) ] || die "records done: $rd, expected $((SHARDS * 64))"
docker compose run --rm -T trainer shards verify /shards/$JOB_OUT > "$WORK/verify.log" 2>&1 \
    || { cat "$WORK/verify.log"; die "shards verify failed"; }
sed 's/^/    /' "$WORK/verify.log"
grep -q "^/shards/$JOB_OUT: $SHARDS/$SHARDS shards, $((SHARDS * 64)) records (planned $((SHARDS * 64))), 0 failed" \
    "$WORK/verify.log" || die "not every planned record is in the shards exactly once"
# Which host wrote each shard: the manifests' host against the containers' (their ids' first 12).
HEAD_WORKERS=$(docker compose ps -aq worker)
python3 - "$JOB_OUT" "$HEAD_WORKERS" "$H2_WORKERS" <<'EOF' || die "the manifests do not name workers of both hosts"
import json, sys
from pathlib import Path
out, head, host2 = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
hosts = {}
for m in sorted(Path("shards", out).glob("shard-*/manifest.json")):
    hosts[m.parent.name] = json.loads(m.read_text()).get("host")
print("    hostname of each shard: " + ", ".join(f"{k[-2:]} {v}" for k, v in hosts.items()))
named = set(hosts.values())
by_head = {h for h in named if any(c.startswith(str(h)) for c in head)}
by_host2 = {h for h in named if any(c.startswith(str(h)) for c in host2)}
print(f"    head's workers: {sorted(by_head)}; host 2's workers: {sorted(by_host2)}")
sys.exit(0 if by_head and by_host2 and by_head | by_host2 == named else 1)
EOF

# -- 5. two nodes training on the shards ---------------------------------------------------------------
step "two trainer containers, one per host, train as two nodes (torchrun --nnodes 2, gloo)"
h2 rm -fsv worker >/dev/null 2>&1 || true
TORCHRUN=(--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400
          --rdzv-id "cluster-e2e-$$" -m reidgen train-reid --preset tiny --epochs 1 --workers 0 --no-eval
          --data market1501_mini --shards "/shards/$JOB_OUT" --out /runs/cluster-reid)
docker compose run --rm -T --entrypoint torchrun trainer --node-rank 0 "${TORCHRUN[@]}" \
    > "$WORK/node0.log" 2>&1 &
NODE0=$!
set +e
h2 --profile trainer run --rm -T --entrypoint torchrun trainer --node-rank 1 "${TORCHRUN[@]}" \
    > "$WORK/node1.log" 2>&1
rc1=$?
wait $NODE0
rc0=$?
set -e
tail -n 3 "$WORK/node0.log" | sed 's/^/    node 0 | /'
tail -n 3 "$WORK/node1.log" | sed 's/^/    node 1 | /'
[ "$rc0" = 0 ] && [ "$rc1" = 0 ] || die "the nodes exited $rc0 and $rc1"
# Both nodes' --out is the shared runs folder: rank 0 (whichever host the rendezvous numbered 0)
# writes the run there. The run's end record says whether the ranks ended in sync.
python3 - runs/cluster-reid <<'EOF' || die "the two nodes' run is incomplete"
import json, sys
from pathlib import Path
ends = []
for folder in map(Path, sys.argv[1:]):
    checkpoints = sorted(p.name for p in folder.glob("checkpoints/*.pt"))
    log = folder / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(f"    {folder}: checkpoints {checkpoints or 'none'}" + (", the run's log" if log.exists() else ""))
    ends += [r for r in records if r.get("event") == "end"]
if not ends:
    sys.exit("no end record in either node's metrics.jsonl")
end = ends[-1]
print(f"    end: {json.dumps({k: end.get(k) for k in ('hosts', 'ranks_in_sync', 'checkpoint_copies')})}")
sys.exit(0 if end.get("ranks_in_sync", True) is not False else "the two nodes' weights differ")
EOF

# -- 6. nothing left -----------------------------------------------------------------------------------------
step "both projects down -v"
h2 --profile trainer down -v --timeout 10 >/dev/null 2>&1 || die "host 2's down failed"
docker compose --profile trainer --profile flower down -v --timeout 20 >/dev/null 2>&1 || die "the head's down failed"
for project in "$COMPOSE_PROJECT_NAME" "$HOST2"; do
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$project";
           docker network ls -q --filter "label=com.docker.compose.project=$project";
           docker volume ls -q --filter "label=com.docker.compose.project=$project")
    [ -z "$left" ] || die "left of $project: $(tr '\n' ' ' <<<"$left")"
done
say "no container, network or volume of either project is left"

step "done"
STEP=""
