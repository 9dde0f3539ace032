#!/bin/sh
# Entry point of the `redis` stage of docker/Dockerfile (Debian's redis-server), doing what the
# official Redis image's docker-entrypoint.sh does: started as root to run redis-server, it makes
# the data folder (the redis-data volume, /data) belong to the `redis` user and runs the server as
# that user; anything else runs as given.
set -eu
if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
    chown -R redis:redis .
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
