"""The cluster deployment's files, checked without a Docker engine (issue 26; docs/scaling/index.md).

- docker-compose.head.yml (over docker-compose.yml, with or without the CPU override) and
  docker-compose.worker.yml (alone, or with docker-compose.worker.cpu.yml) are valid against the
  Compose specification's JSON schema;
- the head publishes only the api's port and Redis's TLS port to other hosts; Redis's plain port
  is not published;
- the head's redis command, run for real against a local redis-server with certificates from
  docker/make-ca.sh, takes a client with the lab's client certificate and the password, and
  refuses one without the password, without a client certificate, or without TLS;
- a worker host runs workers only, reaches Redis by a rediss:// URL with the password, the CA and
  its client certificate from secrets, and mounts the data, models and shards at the head's paths;
- `redis_url` builds the TLS URL redis-py and kombu read, and refuses a missing file, a TLS file
  with a plain URL, TLS options written in the URL, and a certificate without its key, each with
  one message;
- docker/cluster_e2e.sh parses, and `make cluster-e2e` and `make bench-load` are not part of
  `make test`.

The run for real is `make cluster-e2e` (docker/cluster_e2e.sh; needs Docker).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import yaml
from test_deploy import (
    CONTAINER_REQUIRED,
    ComposeLoader,
    all_code_env_reads,
    as_list,
    command_modules,
    cpu_override,
    env_read_by,
    environment,
    interpolate,
    merge,
    mounted_secrets,
    parse_reidgen,
    schema_errors,
)
from test_deploy import compose as base_compose

from reidgen.core.errors import ReidgenError

REPO = Path(__file__).resolve().parents[1]
HEAD_FILE = REPO / "docker-compose.head.yml"
WORKER_FILE = REPO / "docker-compose.worker.yml"
WORKER_CPU_FILE = REPO / "docker-compose.worker.cpu.yml"
TLS_VARIABLES = ("REDIS_PASSWORD_FILE", "REDIS_CA_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE")
SAME_PATHS = ("/data", "/models", "/shards", "/mask-models")  # a job names files under these on every host


def load(path: Path) -> dict:
    return yaml.load(interpolate(path.read_text()), Loader=ComposeLoader)


def head() -> dict:
    return merge(base_compose(), load(HEAD_FILE))


def head_cpu() -> dict:
    return merge(merge(base_compose(), cpu_override()), load(HEAD_FILE))


def worker_host() -> dict:
    return load(WORKER_FILE)


def worker_host_cpu() -> dict:
    return merge(worker_host(), load(WORKER_CPU_FILE))


def without_build_secrets(doc: dict) -> dict:
    """build.secrets is newer than the 2021 schema kept in docker/ (Compose v2 reads it)."""
    doc = json.loads(json.dumps(doc))
    for svc in doc["services"].values():
        if isinstance(svc.get("build"), dict):
            svc["build"].pop("secrets", None)
    return doc


@pytest.mark.parametrize("name, make", [("head", head), ("head on the CPU", head_cpu),
                                        ("worker host", worker_host), ("worker host on the CPU", worker_host_cpu)])
def test_cluster_files_are_valid_against_the_compose_spec_schema(name, make):
    assert schema_errors(without_build_secrets(make())) == [], name


def published(service: dict) -> list[tuple[str, str]]:
    """(host address or '' for every interface, container port) of each published port."""
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            out.append((item.get("host_ip", ""), str(item["target"])))
            continue
        parts = str(item).split(":")
        address = parts[0] if len(parts) == 3 else ""
        out.append((address, parts[-1].split("/")[0]))
    return out


@pytest.mark.parametrize("make", [head, head_cpu])
def test_the_head_publishes_only_the_api_and_the_redis_tls_port(make):
    doc = make()
    reachable = {(name, port) for name, svc in doc["services"].items() for address, port in published(svc)
                 if not address.startswith("127.")}
    assert reachable == {("api", "8000"), ("redis", "6380")}
    assert ("redis", "6379") not in {(n, p) for n, s in doc["services"].items() for _, p in published(s)}
    assert doc["services"]["redis"]["ports"] == ["6380:6380"]  # REDIS_TLS_PORT's default
    # The head's own services keep the plain port on the head's Docker network.
    for name in ("api", "worker", "flower"):
        assert environment(doc["services"][name])["REDIS_URL"] == "redis://redis:6379/0", name


def head_redis_script(doc: dict) -> str:
    argv = as_list(doc["services"]["redis"]["command"])
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3
    return argv[2]


def test_the_heads_redis_asks_for_tls_a_client_certificate_and_the_password():
    doc = head()
    script = head_redis_script(doc)
    base = as_list(base_compose()["services"]["redis"]["command"])[2]
    # The password and persistence settings of the one-machine deployment, kept as they are.
    assert base.split("exec docker-entrypoint.sh")[0] in script
    assert base.split("exec ")[1] in script
    for flag in ("--tls-port 6380", "--tls-auth-clients yes", "--tls-cert-file /run/redis-tls/redis_tls_cert",
                 "--tls-key-file /run/redis-tls/redis_tls_key", "--tls-ca-cert-file /run/redis-tls/redis_tls_ca"):
        assert flag in script, flag
    assert not re.search(r"--port\s+0\b", script)  # the plain port stays for the head's own services
    secrets = mounted_secrets(doc["services"]["redis"])
    for name in ("redis_password", "redis_tls_cert", "redis_tls_key", "redis_tls_ca"):
        assert secrets.get(f"/run/secrets/{name}") == name
    assert doc["secrets"]["redis_tls_key"] == {"file": "./secrets/tls/redis-server.key"}
    assert doc["secrets"]["redis_tls_ca"] == {"file": "./secrets/tls/ca.crt"}
    assert doc["services"]["redis"]["tmpfs"] == ["/run/redis-tls:mode=700"]  # the key's copy is in memory


def test_the_worker_host_runs_workers_only_over_tls_with_the_secrets(monkeypatch, tmp_path):
    from worker.celery_app import redis_url

    doc = worker_host()
    assert set(doc["services"]) == {"worker", "trainer"}
    assert doc["services"]["trainer"]["profiles"] == ["trainer"]
    head_worker = base_compose()["services"]["worker"]
    for name, svc in doc["services"].items():
        assert not svc.get("ports"), f"{name} publishes a port; a worker host listens on nothing"
        env = environment(svc)
        assert urlsplit(env["REDIS_URL"]).scheme == "rediss", name
        assert urlsplit(env["REDIS_URL"]).password is None, name
        secrets = mounted_secrets(svc)
        for variable in TLS_VARIABLES:
            assert env[variable].startswith("/run/secrets/") and env[variable] in secrets, (name, variable)
        targets = {v.split(":")[1] for v in svc["volumes"]}
        assert set(SAME_PATHS) <= targets, name
        for variable in ("REIDGEN_DATA", "REIDGEN_MODELS_ROOT", "REIDGEN_SHARDS_ROOT", "REIDGEN_MASK_MODEL"):
            assert env[variable] == environment(head_worker)[variable], (name, variable)
    # The worker mounts each folder from the same variable as the head's worker, at the same path.
    assert doc["services"]["worker"]["volumes"] == head_worker["volumes"]
    for secret, spec in doc["secrets"].items():
        assert spec["file"].startswith("./secrets/"), secret
    # What the code makes of the environment: the URL with the password and the three files.
    files = {}
    for variable, secret in zip(TLS_VARIABLES, ("pw", "ca.crt", "client.crt", "client.key")):
        files[variable] = tmp_path / secret
        files[variable].write_text("s3cret\n" if secret == "pw" else "PEM\n")
        monkeypatch.setenv(variable, str(files[variable]))
    monkeypatch.setenv("REDIS_URL", environment(doc["services"]["worker"])["REDIS_URL"])
    url = urlsplit(redis_url())
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert (url.scheme, url.password, url.port) == ("rediss", "s3cret", 6380)
    assert query == {"ssl_cert_reqs": "required", "ssl_ca_certs": str(files["REDIS_CA_FILE"]),
                     "ssl_certfile": str(files["REDIS_CERT_FILE"]), "ssl_keyfile": str(files["REDIS_KEY_FILE"])}


def test_the_worker_host_sets_what_its_code_reads_and_nothing_dead():
    read = all_code_env_reads()
    for name, svc in worker_host()["services"].items():
        env = environment(svc)
        argv = ["reidgen"] + as_list(svc["command"])
        command = parse_reidgen(argv[1:]).command
        needed = env_read_by(command_modules(command)) & (set(CONTAINER_REQUIRED) | set(TLS_VARIABLES))
        assert needed <= set(env), f"{name} does not set {sorted(needed - set(env))}"
        for variable in env:
            if variable.startswith(("REIDGEN_", "REDIS_")):
                assert variable in read, f"{name} sets {variable}, which no code reads"


def test_the_cpu_overrides_of_the_cluster_reserve_no_gpu_and_change_nothing_else():
    base, merged = worker_host(), worker_host_cpu()
    assert "nvidia" not in json.dumps(merged["services"])
    for name, svc in merged["services"].items():
        for key in set(svc) | set(base["services"][name]):
            if key not in ("build", "deploy"):
                assert svc.get(key) == base["services"][name].get(key), (name, key)
        assert svc["build"]["args"]["BASE_IMAGE"] == "reidgen-base:bookworm"
        assert svc["build"]["secrets"] == ["ca_bundle"]
    cpu_head = head_cpu()
    assert "nvidia" not in json.dumps(cpu_head["services"])
    assert cpu_head["services"]["redis"]["image"] == "reidgen-redis:latest"  # Debian's redis-server: TLS built in


# -- the TLS URL -------------------------------------------------------------------------------------
def test_redis_url_adds_the_tls_options_redis_py_and_kombu_read(monkeypatch, tmp_path):
    from kombu import Connection

    from worker.celery_app import make_app, redis_url

    (tmp_path / "pw").write_text("p@ss/w:rd\n")
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("PEM\n")
    monkeypatch.setenv("REDIS_URL", "rediss://head.lab.example:6380/2")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    for name in ("REDIS_CA_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    # rediss:// alone: the certificate is still checked (against the system's CAs), never skipped.
    assert redis_url().endswith("@head.lab.example:6380/2?ssl_cert_reqs=required")
    monkeypatch.setenv("REDIS_CA_FILE", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("REDIS_CERT_FILE", str(tmp_path / "c.crt"))
    monkeypatch.setenv("REDIS_KEY_FILE", str(tmp_path / "c.key"))
    url = redis_url()
    pool = redis.Redis.from_url(url).connection_pool
    kwargs = pool.connection_kwargs
    assert pool.connection_class is redis.SSLConnection
    assert (kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == ("p@ss/w:rd", "head.lab.example",
                                                                                  6380, 2)
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == \
        ("required", str(tmp_path / "ca.crt"), str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tmp_path / "ca.crt"),
                "ssl_certfile": str(tmp_path / "c.crt"), "ssl_keyfile": str(tmp_path / "c.key")}
    assert Connection(url).ssl == expected
    connection = make_app().connection_for_write()
    assert (connection.transport_cls, connection.ssl, connection.password) == ("rediss", expected, "p@ss/w:rd")
    # A plain URL with no TLS file stays as it was.
    for name in ("REDIS_CA_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    assert redis_url() == "redis://:p%40ss%2Fw%3Ard@redis:6379/0"


@pytest.mark.parametrize("url, files, message", [
    ("rediss://head:6380/0", {"REDIS_CA_FILE": None},
     r"^cannot read .*/missing, which REDIS_CA_FILE names \(No such file or directory\); a rediss:// REDIS_URL "
     r"needs it readable \(docker/make-ca.sh makes the files\)$"),
    ("rediss://head:6380/0", {"REDIS_CA_FILE": "ca", "REDIS_CERT_FILE": "c", "REDIS_KEY_FILE": None},
     "which REDIS_KEY_FILE names"),
    ("redis://head:6380/0", {"REDIS_CA_FILE": "ca"},
     "REDIS_CA_FILE is set but REDIS_URL is not a rediss:// URL, so nothing would be encrypted"),
    ("redis://head:6380/0", {"REDIS_CERT_FILE": "c", "REDIS_KEY_FILE": "k"},
     "REDIS_CERT_FILE and REDIS_KEY_FILE are set but REDIS_URL is not a rediss:// URL"),
    ("rediss://head:6380/0?ssl_cert_reqs=none", {}, "REDIS_URL carries ssl_\\* options"),
    ("rediss://head:6380/0", {"REDIS_CERT_FILE": "c"}, "REDIS_CERT_FILE and REDIS_KEY_FILE go together"),
])
def test_redis_url_refuses_what_would_not_be_tls_or_cannot_be_read(monkeypatch, tmp_path, url, files, message):
    """One message each, naming the variable; never a silent fall-back to no check or no TLS."""
    from worker.celery_app import redis_url

    for name in ("REDIS_PASSWORD_FILE", "REDIS_CA_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, file in files.items():
        path = tmp_path / (file or "missing")
        if file:
            path.write_text("PEM\n")
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ReidgenError, match=message) as err:
        redis_url()
    assert "\n" not in str(err.value)


def test_a_worker_host_with_a_secret_missing_stops_with_its_name(monkeypatch, tmp_path, capsys):
    """`reidgen worker` with the CA file missing: one line naming it, exit status 2, before any
    connection is tried (the Celery app is configured from the settings when the worker starts)."""
    import worker.celery_app as celery_app
    from reidgen.cli import main

    monkeypatch.setattr(celery_app, "_installed", celery_app._installed)  # the worker installs its settings
    monkeypatch.setattr(celery_app.app.conf, "broker_url", celery_app.app.conf.broker_url)
    monkeypatch.setenv("REDIS_URL", "rediss://head.lab.example:6380/0")
    monkeypatch.setenv("REDIS_CA_FILE", str(tmp_path / "ca.crt"))
    for name in ("REDIS_PASSWORD_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert err == (f"reidgen: error: cannot read {tmp_path / 'ca.crt'}, which REDIS_CA_FILE names (No such file "
                   f"or directory); a rediss:// REDIS_URL needs it readable (docker/make-ca.sh makes the files)\n")


# -- the lab CA and the head's redis command, for real ------------------------------------------------
def make_ca(folder: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "docker" / "make-ca.sh"), str(folder), *names], capture_output=True,
                          text=True, timeout=120)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


@needs_openssl
def test_make_ca_makes_a_ca_a_server_and_a_client_certificate(tmp_path):
    tls = tmp_path / "tls"
    result = make_ca(tls, "head.lab.example", "10.0.0.5")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "ca.key", "redis-client.crt", "redis-client.key",
                                                     "redis-server.crt", "redis-server.key"]
    assert (tls.stat().st_mode & 0o777) == 0o700
    for key in tls.glob("*.key"):
        assert (key.stat().st_mode & 0o777) == 0o600, key.name
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tls / "redis-server.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:head.lab.example, IP Address:10.0.0.5" in text and "TLS Web Server Authentication" in text
    client = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tls / "redis-client.crt")],
                            capture_output=True, text=True, check=True).stdout
    assert "TLS Web Client Authentication" in client
    ca = (tls / "ca.crt").read_bytes()
    # Again with other names: the CA is kept (the hosts keep trusting it), the server certificate is new.
    assert make_ca(tls, "head2.lab.example").returncode == 0
    assert (tls / "ca.crt").read_bytes() == ca
    for name in ("redis-server.crt", "redis-client.crt"):
        assert subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.crt"), str(tls / name)],
                              capture_output=True).returncode == 0
    assert make_ca(tmp_path / "x").returncode != 0  # no name: usage, nothing made


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_redis(tmp_path):
    """The head's redis command run by sh here: the secrets at temporary paths (certificates from
    make-ca.sh for 127.0.0.1), stand-ins for the image's entry point (redis-server on free loopback
    ports) and for chown (no redis user needed). Yields (plain port, TLS port, folder of the files)."""
    if not (shutil.which("redis-server") and shutil.which("openssl")):
        pytest.skip("no redis-server or openssl")
    tls = tmp_path / "tls"
    assert make_ca(tls, "localhost", "127.0.0.1").returncode == 0
    secrets, run_tls, bin_dir = tmp_path / "secrets", tmp_path / "redis-tls", tmp_path / "bin"
    for folder in (secrets, run_tls, bin_dir):
        folder.mkdir()
    password = "pw-" + os.urandom(8).hex()
    (secrets / "redis_password").write_text(password + "\n")
    for secret, made in (("redis_tls_cert", "redis-server.crt"), ("redis_tls_key", "redis-server.key"),
                         ("redis_tls_ca", "ca.crt")):
        shutil.copy(tls / made, secrets / secret)
    port, tls_port = _free_port(), _free_port()
    for name, body in (("docker-entrypoint.sh", f'exec "$@" --port {port} --bind 127.0.0.1 --dir "{tmp_path}" '
                                                f'--save ""'), ("chown", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = head_redis_script(head()).replace("/run/secrets/", f"{secrets}/") \
        .replace("/run/redis-tls", str(run_tls)).replace("--tls-port 6380", f"--tls-port {tls_port}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", tls_port), timeout=1):
                break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"the head's redis command exited: {server.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
    yield {"port": port, "tls_port": tls_port, "tls": tls, "password": password, "secrets": secrets}
    server.terminate()
    server.wait(10)


def test_the_heads_redis_takes_the_lab_client_and_refuses_the_others(head_redis, monkeypatch):
    from worker.celery_app import make_app, redis_url

    h, tls = head_redis, head_redis["tls"]
    monkeypatch.setenv("REDIS_URL", f"rediss://127.0.0.1:{h['tls_port']}/0")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(h["secrets"] / "redis_password"))
    monkeypatch.setenv("REDIS_CA_FILE", str(tls / "ca.crt"))
    monkeypatch.setenv("REDIS_CERT_FILE", str(tls / "redis-client.crt"))
    monkeypatch.setenv("REDIS_KEY_FILE", str(tls / "redis-client.key"))
    assert redis.Redis.from_url(redis_url(), socket_connect_timeout=5).ping()
    with make_app().connection_for_write() as connection:  # what a worker does: Celery's broker connection
        connection.ensure_connection(max_retries=1)
        assert connection.connected

    def refused(url: str, **kwargs) -> str:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5, **kwargs)
        with pytest.raises(redis.RedisError) as err:
            client.ping()
        return f"{type(err.value).__name__}: {err.value}"

    good = redis_url()
    # No password: TLS and the certificate pass, then Redis asks for the password.
    assert "AuthenticationError" in refused(re.sub(r"//:[^@]+@", "//", good))
    # No client certificate: the TLS handshake fails.
    assert "ConnectionError" in refused(re.sub(r"&ssl_certfile=[^&]+&ssl_keyfile=[^&]+", "", good))
    # Not TLS: plain text on the TLS port.
    assert "ConnectionError" in refused(f"redis://:{h['password']}@127.0.0.1:{h['tls_port']}/0")
    # A server certificate of another CA: the client refuses it.
    other = h["tls"].parent / "other"
    assert make_ca(other, "127.0.0.1").returncode == 0
    assert "ConnectionError" in refused(good.replace(str(tls / "ca.crt"), str(other / "ca.crt")))
    # The plain port (unpublished; the head's own services) still takes the password.
    assert redis.Redis(host="127.0.0.1", port=h["port"], password=h["password"]).ping()


# -- the e2e script and the Makefile --------------------------------------------------------------------
def test_cluster_e2e_script_parses_and_is_not_part_of_make_test():
    script = REPO / "docker" / "cluster_e2e.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(script, os.X_OK) and os.access(REPO / "docker" / "make-ca.sh", os.X_OK)
    assert subprocess.run(["sh", "-n", str(REPO / "docker" / "make-ca.sh")]).returncode == 0
    makefile = (REPO / "Makefile").read_text()
    assert "docker/cluster_e2e.sh" in makefile.split("\ncluster-e2e:", 1)[1].split("\n\n")[0]
    assert "bench/load_head.py" in makefile.split("\nbench-load:", 1)[1].split("\n\n")[0]
    test_target = makefile.split("\ntest:", 1)[1].split("\n\n")[0]
    assert "cluster" not in test_target and "load_head" not in test_target
    text = script.read_text()
    assert "trap cleanup EXIT" in text and re.search(r"down -v\b", text)
    # Host 2 is the Compose project `host2` of the worker host's files; it is killed mid-job.
    assert re.search(r"^HOST2=host2$", text, re.M)
    assert re.search(r'^h2\(\) \{ docker compose -p "\$HOST2" -f docker-compose.worker.yml', text, re.M)
    assert re.search(r"^h2 kill\b", text, re.M)
    assert re.search(r"^export API_PORT=127\.0\.0\.1:8000$", text, re.M)  # the api on loopback only


def test_load_benchmark_parses_its_arguments():
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_head", REPO / "bench" / "load_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.percentile([3, 1, 2, 4], 50) in (2, 3) and module.percentile([], 99) is None
    assert module.latency_ms([0.001, 0.002]) == {"n": 2, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 2.0}
