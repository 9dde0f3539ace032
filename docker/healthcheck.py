"""Container health probe for every `reidgen` command (the image's HEALTHCHECK).

It finds the container's `reidgen` process, parses its arguments with the CLI's own parser and
checks what that command serves: `serve` answers GET /v1/healthz, a `worker` answers a Celery
ping from its broker; any other command (training, generation) is healthy while it runs.
Exit 0 = healthy, 1 = unhealthy (Docker's convention).
"""
from __future__ import annotations

import sys
import urllib.request
from pathlib import Path


def reidgen_argv() -> list[str] | None:
    """The arguments after `reidgen` of the first process running the CLI (PID 1, or under an init)."""
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = proc.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # the process ended while we looked
        for i, arg in enumerate(argv):
            if Path(arg).name == "reidgen":
                return [a for a in argv[i + 1:] if a]
    return None


def main() -> int:
    argv = reidgen_argv()
    if argv is None:
        print("no reidgen process is running", file=sys.stderr)
        return 1
    return probe(argv)


def probe(argv: list[str]) -> int:
    """0 if the command ``reidgen ARGV`` is healthy, else 1."""
    from reidgen.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # e.g. `reidgen --help`: nothing to probe
        return 0
    if args.command == "serve":
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "localhost") else args.host
        try:
            urllib.request.urlopen(f"http://{host}:{args.port}/v1/healthz", timeout=5)
        except OSError as exc:  # refused, timed out, or an HTTP error status
            print(f"GET /v1/healthz failed: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "worker":
        from celery.utils.nodenames import default_nodename, host_format

        from worker.celery_app import app

        # The node name the worker gave itself: celery@HOSTNAME, or --hostname with %h etc. expanded.
        node = host_format(default_nodename(args.hostname))
        if not app.control.ping(destination=[node], timeout=5):
            print(f"worker {node} did not answer a ping through the broker", file=sys.stderr)
            return 1
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
