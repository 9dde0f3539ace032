"""The deployment files, checked here without a Docker engine.

- docker-compose.yml is valid against the Compose specification's JSON schema (a copy kept in
  docker/, see docker/README.md), and has the services, health conditions and volumes of the lab
  deployment;
- every command a service runs exists: `reidgen` commands parse with the CLI's own parser, the
  Celery app Flower is pointed at imports;
- the build context holds what the Dockerfile copies, and .dockerignore excludes none of it;
- the environment: each service sets the variables its code reads whose defaults are wrong in a
  container, every REIDGEN_*/REDIS_* variable set is read by the code (no dead settings), and
  .env.example documents exactly the ${...} variables of docker-compose.yml;
- the api, listening on all interfaces, requires an API key;
- Redis requires a password from a secret file, every service that talks to Redis gets it through
  ``REDIS_PASSWORD_FILE`` (never inline in a URL), Flower requires a login from a secret file, and
  the secrets are files under secrets/. The redis command and health probe run for real against
  a local redis-server when there is one; the code that puts the password into the URL is
  unit-tested.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml

from generator_service.http.serve import _is_loopback
from reidgen.cli import build_parser
from reidgen.core.errors import ReidgenError
from reidgen.core.settings import ALL_SETTINGS, FlowerSettings, env_names

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = REPO / "docker" / "compose-spec.schema.json"
PACKAGES = ("reidgen", "api_schemas", "generator_service", "worker", "trainer")

# Variables whose default is wrong inside a container, so a service whose code reads them must
# set them: each default points at the developer's checkout or at this machine.
CONTAINER_REQUIRED = {
    "REDIS_URL": "defaults to redis://127.0.0.1:6379/0; the broker is the `redis` service",
    "REIDGEN_DATA": "defaults to ../shared/data beside the checkout; the data volume is /data",
    "REIDGEN_MASK_MODEL": "defaults to ../shared/models beside the checkout; the models are at /mask-models",
    "REDIS_PASSWORD_FILE": "unset means no password; the redis service requires the redis_password secret",
}
# Commands run with `docker compose run trainer COMMAND ...` (the trainer's one-off uses).
TRAINER_COMMANDS = ("train-reid", "train-dgnet", "train-crgan", "masks", "evaluate", "swap-grid")


# -- reading the files ---------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with no .env: each variable becomes its default (or empty)."""
    def default(m: re.Match) -> str:
        return m.group(3) if m.group(2) in (":-", "-") else ""
    return _VAR.sub(default, text.replace("$$", "\0")).replace("\0", "$")


def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text()))


def as_list(command) -> list[str]:
    """A Compose command or entrypoint (a list, or a string split like a shell would)."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value"] form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Per build stage: its base, ENV, ENTRYPOINT, CMD (inherited from a stage it builds FROM),
    the sources of its COPY instructions (not --from) and its RUN lines."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, dict] = {}
    stage: dict | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            base = stages.get(words[0], {"env": {}, "entrypoint": None, "cmd": None})
            stage = {"base": words[0], "env": dict(base["env"]), "entrypoint": base["entrypoint"],
                     "cmd": base["cmd"], "copy": [], "run": []}
            stages[words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))] = stage
        elif instruction == "ENV":
            if "=" in rest.split()[0]:
                stage["env"].update(w.split("=", 1) for w in shlex.split(rest))
            else:  # the old `ENV KEY value` form
                key, _, value = rest.partition(" ")
                stage["env"][key] = value.strip()
        elif instruction == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if not any(w.startswith("--from") for w in rest.split()):
                stage["copy"].extend(words[:-1])
        elif instruction == "RUN":
            stage["run"].append(rest)
        elif instruction in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if instruction == "ENTRYPOINT":
                stage["entrypoint"], stage["cmd"] = value, None  # Docker resets CMD with ENTRYPOINT
            else:
                stage["cmd"] = value
    return stages


def built_services() -> dict[str, tuple[dict, dict]]:
    """Services built from this repository: name → (service, its Dockerfile stage)."""
    out = {}
    for name, svc in compose()["services"].items():
        if "build" in svc:
            build = svc["build"]
            stages = dockerfile_stages(REPO / build["context"] / build.get("dockerfile", "Dockerfile"))
            out[name] = (svc, stages[build.get("target", list(stages)[-1])])
    return out


def effective_argv(svc: dict, stage: dict) -> list[str]:
    entrypoint = as_list(svc["entrypoint"]) if "entrypoint" in svc else stage["entrypoint"]
    command = as_list(svc["command"]) if "command" in svc else (stage["cmd"] or [])
    return list(entrypoint or []) + command


def parse_reidgen(args: list[str]):
    """Parse a `reidgen` command line with the CLI's parser; a parse error fails the test."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`reidgen {' '.join(args)}` does not parse with reidgen.cli.build_parser() (see stderr)")


# -- the Compose specification ------------------------------------------------------------------
def schema_errors(document: dict) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    # The file declares draft 2019-09 under a URL jsonschema does not know ("http://...#").
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_spec_schema():
    assert schema_errors(compose()) == []


def test_the_schema_check_rejects_a_broken_file():
    """The validation is not vacuous: a misspelt key and a wrong type are caught."""
    doc = compose()
    doc["services"]["api"]["comand"] = ["serve"]
    doc["services"]["worker"]["deploy"] = "gpu"
    errors = schema_errors(doc)
    assert any("comand" in e for e in errors) and any(e.startswith("services/worker/deploy") for e in errors)


def test_services_health_conditions_and_volumes():
    services = compose()["services"]
    assert {"redis", "api", "worker", "trainer", "flower"} <= set(services)
    assert services["trainer"]["profiles"] == ["trainer"] and services["flower"]["profiles"] == ["flower"]
    assert services["redis"]["healthcheck"]["test"]
    # Everything that talks to Redis waits until it answers, not merely until it started.
    for name in ("api", "worker", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in ("api", "worker", "trainer"):  # GPU reservations
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
    assert "replicas" not in services["worker"].get("deploy", {})  # `--scale worker=N` decides
    assert "container_name" not in services["worker"]              # (a fixed name cannot scale)
    mounts = {name: {v.split(":")[1]: v for v in svc.get("volumes", [])} for name, svc in services.items()}
    for target in ("/data", "/models", "/runs", "/shards"):
        assert any(target in m for m in mounts.values()), f"no service mounts {target}"
    for name, m in mounts.items():
        if "/data" in m and name != "redis":
            assert m["/data"].endswith(":ro"), f"{name} must mount the data read-only (research licence)"
    # Workers write shards; the api writes a job's job.json; both see the same paths.
    for name in ("api", "worker"):
        assert mounts[name]["/shards"].count(":") == 1, f"{name} must mount /shards writable"
        assert set(mounts[name]) >= {"/data", "/models", "/runs", "/shards"}, name


def test_api_healthcheck_probes_healthz_on_the_port_it_serves():
    svc, stage = built_services()["api"]
    args = parse_reidgen(effective_argv(svc, stage)[1:])
    probe = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/v1/healthz" in probe
    assert any(p.endswith(f":{args.port}") for p in svc["ports"])
    assert "curl" not in probe and "wget" not in probe  # the image is not known to have them; python it has


# -- commands exist ------------------------------------------------------------------------------
def test_every_reidgen_command_of_every_service_parses():
    seen = set()
    for name, (svc, stage) in built_services().items():
        argv = effective_argv(svc, stage)
        if argv[0] != "reidgen":
            continue
        args = parse_reidgen(argv[1:])
        assert callable(args.func), name
        seen.add(args.command)
    assert {"serve", "worker", "train-reid"} <= seen


def test_trainer_one_off_commands_exist():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(TRAINER_COMMANDS) <= set(choices)


def test_a_missing_subcommand_fails_the_check():
    with pytest.raises(pytest.fail.Exception):
        parse_reidgen(["no-such-command", "--models", "/models"])


def test_flower_runs_this_projects_celery_app():
    svc, stage = built_services()["flower"]
    argv = effective_argv(svc, stage)
    assert argv[0] == "celery" and "flower" in argv
    module = argv[argv.index("--app") + 1]
    from celery import Celery

    assert isinstance(importlib.import_module(module).app, Celery)
    assert any("flower" in run for run in stage["run"])  # installed in the image it runs in


# -- the build context ---------------------------------------------------------------------------
def dockerignore_patterns(context: Path) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, with Docker's ** and path-wise * and ?."""
    rules = []
    path = context / ".dockerignore"
    for line in (path.read_text().splitlines() if path.exists() else []):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        rules.append((negated, re.compile(regex)))
    return rules


def ignored(rel: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negated
    return result


def test_build_context_holds_what_the_dockerfile_copies():
    checked = 0
    for name, (svc, stage) in built_services().items():
        context = (REPO / svc["build"]["context"]).resolve()
        rules = dockerignore_patterns(context)
        for source in stage["copy"]:
            path = context / source
            assert path.exists(), f"{name}: COPY {source}: not in the build context {context}"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files, f"{name}: COPY {source} copies no Python file"
            for f in files:
                rel = f.relative_to(context).as_posix()
                assert not ignored(rel, rules), f"{name}: {rel} is copied but .dockerignore excludes it"
                checked += 1
    assert checked > 20


def test_image_installs_every_package_of_the_distribution():
    _, stage = built_services()["api"]
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in includes}
    assert packages == set(PACKAGES)
    assert packages <= {s.strip("./") for s in stage["copy"]}
    assert {"pyproject.toml", "README.md"} <= set(stage["copy"])  # pyproject names README.md as readme


def test_dockerignore_keeps_data_and_environments_out():
    rules = dockerignore_patterns(REPO)
    for rel in (".venv/bin/python", ".git/HEAD", "runs/demo/checkpoints/last.pt", "data/market1501/x.jpg",
                "shards/job/shard-00000/data.mdb", "secrets/api_key", ".env", "worker/__pycache__/x.pyc"):
        assert ignored(rel, rules), rel
    assert not ignored("generator_service/inference/engine.py", rules)


# -- environment variables -----------------------------------------------------------------------
def _env_name(node: ast.AST, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and \
        isinstance(node.value, ast.Name) and node.value.id == "os"


_SETTINGS_CLASSES = {cls.__name__: cls for cls in ALL_SETTINGS}


def env_reads(tree: ast.Module) -> set[str]:
    """The variables of every settings class a module names (reidgen.core.settings: each field is a
    variable), and names read with os.environ.get(X), os.getenv(X), os.environ[X] or `X in
    os.environ`, where X is a literal or a module-level constant. Writes do not count."""
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    names = set()
    for node in ast.walk(tree):
        named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.name if isinstance(node, ast.alias) else None
        if named in _SETTINGS_CLASSES:
            names |= env_names(_SETTINGS_CLASSES[named])
        arg = None
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            if isinstance(f, ast.Attribute) and ((f.attr == "get" and _is_environ(f.value)) or
                                                 (f.attr == "getenv" and isinstance(f.value, ast.Name)
                                                  and f.value.id == "os")):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            arg = node.slice
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            arg = node.left
        if arg is not None and (name := _env_name(arg, constants)):
            names.add(name)
    return names


@functools.cache
def module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def module_imports(name: str, tree: ast.Module) -> set[str]:
    """Project modules a module imports anywhere (function-level imports too, conservatively),
    and modules named in strings (Celery's include=["worker.tasks"] loads them by name)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else \
                ".".join(name.split(".")[:-node.level] + [node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", node.value):
            found.add(node.value)
    return {m for m in found if module_file(m) is not None}


def env_read_by(modules: set[str]) -> set[str]:
    """Variables read by ``modules`` and every project module they import, transitively."""
    todo, seen, names = list(modules), set(), set()
    while todo:
        name = todo.pop()
        if name in seen or (path := module_file(name)) is None:
            continue
        seen.add(name)
        reads, imports = module_facts(name, path)
        names |= reads
        todo.extend(imports)
    return names


@functools.cache
def module_facts(name: str, path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(variables read, project modules imported) of one module, parsed once per test run."""
    tree = ast.parse(path.read_text())
    return frozenset(env_reads(tree)), frozenset(module_imports(name, tree))


def command_modules(command: str) -> set[str]:
    """The modules a `reidgen COMMAND` loads: those imported by its cmd_* function."""
    func = build_parser()._subparsers._group_actions[0].choices[command].get_default("func")
    return module_imports("reidgen.cli", ast.parse(inspect.getsource(func)))


def all_code_env_reads() -> set[str]:
    names = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            names |= env_reads(ast.parse(path.read_text()))
    return names


def test_env_scan_finds_the_variables_the_code_reads():
    """The scanner sees the reads this file relies on (a renamed variable fails here)."""
    assert set(CONTAINER_REQUIRED) | {"REIDGEN_API_KEY"} <= all_code_env_reads()
    assert "REDIS_URL" in env_read_by(command_modules("worker"))  # worker → its Celery app
    assert "REIDGEN_DATA" in env_read_by(command_modules("train-reid"))


def test_each_service_sets_the_variables_its_code_needs():
    for name, (svc, stage) in built_services().items():
        argv = effective_argv(svc, stage)
        if argv[0] != "reidgen":
            continue
        commands = {parse_reidgen(argv[1:]).command} | (set(TRAINER_COMMANDS) if name == "trainer" else set())
        container_env = {**stage["env"], **environment(svc)}
        for command in commands:
            needed = env_read_by(command_modules(command)) & set(CONTAINER_REQUIRED)
            missing = needed - set(container_env)
            assert not missing, f"{name} (`reidgen {command}`) does not set " + \
                "; ".join(f"{v} ({CONTAINER_REQUIRED[v]})" for v in sorted(missing))


def test_no_dead_settings():
    """Every REIDGEN_*/REDIS_* variable the deployment sets is read by the code."""
    read = all_code_env_reads()
    for name, (svc, stage) in built_services().items():
        for var in {**stage["env"], **environment(svc)}:
            if var.startswith(("REIDGEN_", "REDIS_")):
                assert var in read, f"{name} sets {var}, which no code reads"


def test_env_example_documents_the_compose_variables():
    """.env.example holds exactly the ${...} variables of docker-compose.yml, with its defaults."""
    used = {m.group(1): m.group(3) for m in _VAR.finditer(COMPOSE_FILE.read_text())}
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert set(example) == set(used)
    assert example == {k: used[k] for k in example}


# -- the API key ---------------------------------------------------------------------------------
def test_api_on_all_interfaces_requires_an_api_key():
    """`reidgen serve` only warns about a non-loopback host without a key; the deployment must
    not rely on that: the api reads its key from a secret file (it stops if the file is missing
    or empty) or sets REIDGEN_API_KEY."""
    doc = compose()
    svc, stage = built_services()["api"]
    args = parse_reidgen(effective_argv(svc, stage)[1:])
    assert args.command == "serve" and not _is_loopback(args.host)
    if args.api_key_file is None:
        assert environment(svc).get("REIDGEN_API_KEY"), "the api has no API key"
        return
    secret = Path(args.api_key_file)
    assert secret.parent == Path("/run/secrets"), "--api-key-file must be a mounted secret"
    assert secret.name in svc["secrets"] and "file" in doc["secrets"][secret.name]


# -- the image's health probe --------------------------------------------------------------------
def test_image_healthcheck_probes_what_the_command_serves():
    """docker/healthcheck.py: `serve` is healthy while GET /v1/healthz answers on its port; a
    one-off command (training) is healthy while it runs. Probed against a stand-in server."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "docker" / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    port = server.server_address[1]
    serve = ["serve", "--models", "/models", "--host", "0.0.0.0", "--port", str(port)]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert healthcheck.probe(serve) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert healthcheck.probe(serve) == 1  # nothing listens any more
    assert healthcheck.probe(["train-reid", "--data", "market1501", "--out", "/runs/teacher"]) == 0


# -- Redis and Flower credentials ----------------------------------------------------------------
REDIS_CLIENTS = ("api", "worker", "trainer", "flower")  # every service that talks to Redis
_REDIS_URL = re.compile(r"rediss?://[^\s\"',]+")


def mounted_secrets(service: dict) -> dict[str, str]:
    """Path inside the container → secret name, for the short and the long syntax."""
    out = {}
    for item in service.get("secrets") or []:
        source, target = (item, item) if isinstance(item, str) else (item["source"], item.get("target", item["source"]))
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return out


def redis_script(doc: dict) -> str:
    """The shell script the redis service runs (its command is ``sh -c SCRIPT``)."""
    argv = as_list(doc["services"]["redis"]["command"])
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, "redis reads its secret in a `sh -c` command"
    return argv[2]


def redis_password_secret(doc: dict) -> str:
    """The secret the redis service reads its password from (the one file its command reads)."""
    paths = set(re.findall(r"/run/secrets/[\w.-]+", redis_script(doc)))
    assert len(paths) == 1, f"redis must read its password from one secret file, found {sorted(paths)}"
    secrets = mounted_secrets(doc["services"]["redis"])
    path = paths.pop()
    assert path in secrets, f"redis reads {path} but does not mount that secret"
    return secrets[path]


def test_redis_requires_a_password_from_a_secret():
    """Redis reachable without a password is a way to queue tasks for the workers (issue 12)."""
    doc = compose()
    script = redis_script(doc)
    secret = redis_password_secret(doc)
    # --requirepass takes a shell variable read from the secret (never a literal), and an empty
    # secret stops the server rather than meaning "no password".
    m = re.search(r'--requirepass\s+"?\$\{?(\w+)', script)
    assert m, "redis-server must be started with --requirepass $VARIABLE"
    var = m.group(1)
    assert re.search(rf'\b{var}="?\$\(cat /run/secrets/{secret}\)', script), f"${var} must come from the secret"
    assert re.search(rf'\[ -n "?\${var}"? \]', script), "an empty secret must stop redis"
    # Through the image's entry point (it drops root), with the persistence settings kept.
    assert re.search(r"\bexec docker-entrypoint\.sh redis-server\b", script)
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    probe = " ".join(doc["services"]["redis"]["healthcheck"]["test"])
    assert f"REDISCLI_AUTH=\"$(cat /run/secrets/{secret})\"" in probe and "PONG" in probe


def test_no_service_has_a_redis_url_without_credentials(monkeypatch, tmp_path):
    """Every Redis URL of a service is an environment variable the code completes with the password
    of the mounted secret (REDIS_PASSWORD_FILE), none carries a password inline, and every
    service that talks to Redis has one. What the code makes of it is checked too."""
    from worker.celery_app import redis_url

    doc = compose()
    secret = redis_password_secret(doc)
    password_file = tmp_path / "redis_password"
    password_file.write_text("s3cret-from-the-file\n")
    clients = set()
    for name, svc in doc["services"].items():
        env = environment(svc)
        urls = set(_REDIS_URL.findall(json.dumps(svc)))
        if not urls:
            continue
        clients.add(name)
        assert urls <= set(env.values()), f"{name}: a Redis URL outside its environment: {sorted(urls)}"
        assert all(urlsplit(u).password is None for u in urls), f"{name}: a password inline in a Redis URL"
        assert env.get("REDIS_PASSWORD_FILE") == f"/run/secrets/{secret}", f"{name}: REDIS_PASSWORD_FILE"
        assert mounted_secrets(svc).get(f"/run/secrets/{secret}") == secret, f"{name} does not mount {secret}"
        monkeypatch.setenv("REDIS_URL", env["REDIS_URL"])
        monkeypatch.setenv("REDIS_PASSWORD_FILE", str(password_file))
        assert urlsplit(redis_url()).password == "s3cret-from-the-file", name
    assert set(REDIS_CLIENTS) <= clients


def test_flower_requires_basic_auth_from_a_secret(monkeypatch, tmp_path):
    """Flower's entry point loads docker/flower_config.py (a command line cannot drop it), which
    sets basic_auth from the mounted secret and stops Flower when the secret is missing, empty
    or malformed."""
    import runpy

    doc = compose()
    svc, stage = built_services()["flower"]
    conf = [a.split("=", 1)[1] for a in stage["entrypoint"] if a.startswith("--conf=")]
    assert len(conf) == 1, "flower's --conf belongs in its entry point"
    assert [a for a in effective_argv(svc, stage) if a.startswith("--conf")] == [f"--conf={conf[0]}"]
    assert Path(conf[0]).name != "flowerconfig.py"  # Flower skips a missing file of its default name
    assert f"docker/{Path(conf[0]).name}" in stage["copy"]
    config = REPO / "docker" / Path(conf[0]).name
    assert not {"FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"} & set(environment(svc))

    def logins(text: str | None):
        if text is None:
            monkeypatch.setenv("REIDGEN_FLOWER_AUTH_FILE", str(tmp_path / "missing"))
        else:
            (tmp_path / "auth").write_text(text)
            monkeypatch.setenv("REIDGEN_FLOWER_AUTH_FILE", str(tmp_path / "auth"))
        return runpy.run_path(str(config))["basic_auth"]

    assert logins("admin:pa:ss\n") == ["admin:pa:ss"]
    assert logins("admin:one\n\nops:two\n") == ["admin:one", "ops:two"]
    for bad in (None, "", "\n", "admin\n", "admin:\n", ":pass\n"):
        with pytest.raises(SystemExit, match="flower: "):
            logins(bad)
    # Unset (the deployment), it reads the secret the flower service mounts.
    default = str(FlowerSettings.model_fields["auth_file"].default)
    secret = mounted_secrets(svc).get(default)
    assert secret and "file" in doc["secrets"][secret], f"flower does not mount {default}"
    monkeypatch.delenv("REIDGEN_FLOWER_AUTH_FILE")
    if not Path(default).exists():
        with pytest.raises(SystemExit, match="cannot read the login file"):
            runpy.run_path(str(config))


def test_secrets_are_files_under_the_secrets_folder():
    """Every secret is a git-ignored file under secrets/ (never an inline value or an environment
    variable), and every secret declared is used by a service and the other way round."""
    doc = compose()
    for name, secret in doc["secrets"].items():
        assert set(secret) == {"file"}, f"secret {name} must be a file, not {sorted(set(secret) - {'file'})}"
        path = Path(secret["file"])
        assert not path.is_absolute() and path.parts[0] == "secrets" and ".." not in path.parts, \
            f"secret {name}: {secret['file']} is not under ./secrets/"
    used = {s for svc in doc["services"].values() for s in mounted_secrets(svc).values()}
    assert used == set(doc["secrets"])
    assert "secrets/" in (REPO / ".gitignore").read_text().splitlines()


# -- the redis command and probe, run for real (no Docker: a local redis-server) ------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def compose_redis(tmp_path):
    """The redis service's command run by sh on this machine: the secret at a temporary path, and
    stand-ins for the image's entry point (runs redis-server on a free loopback port in a temporary
    folder) and for redis-cli (the same port). Yields (port, secret file, run(script) → process)."""
    import shutil

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("no redis-server / redis-cli on PATH")
    port, secrets, bin_dir = _free_port(), tmp_path / "secrets", tmp_path / "bin"
    secrets.mkdir()
    bin_dir.mkdir()
    _stub(bin_dir, "docker-entrypoint.sh", f'exec "$@" --port {port} --bind 127.0.0.1 --dir "{tmp_path}" --save ""')
    _stub(bin_dir, "redis-cli", f'exec "{shutil.which("redis-cli")}" -p {port} "$@"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("REDISCLI_AUTH", None)
    started = []

    def run(script: str, wait: bool = False) -> subprocess.Popen | subprocess.CompletedProcess:
        script = script.replace("/run/secrets/", f"{secrets}/")
        if wait:
            return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        started.append(proc)
        return proc

    yield port, secrets / redis_password_secret(compose()), run
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_redis_command_and_probe_really_require_the_password(compose_redis, monkeypatch):
    """The compose redis command starts a Redis that refuses clients without the password; the
    URL `redis_url` builds from the secret file logs in; the health probe logs in too."""
    from worker.celery_app import redis_url

    port, secret_file, run = compose_redis
    doc = compose()
    probe = doc["services"]["redis"]["healthcheck"]["test"]
    assert probe[0] == "CMD-SHELL"
    password = "pw-" + os.urandom(12).hex()
    secret_file.write_text(password + "\n")
    server = run(redis_script(doc))
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(secret_file))
    client = redis.Redis.from_url(redis_url(), socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            assert client.ping()
            break
        except redis.ConnectionError:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1).ping()
    assert run(probe[1], wait=True).returncode == 0
    secret_file.write_text("not-the-password\n")
    assert run(probe[1], wait=True).returncode != 0


def test_redis_command_refuses_an_empty_secret(compose_redis):
    _, secret_file, run = compose_redis
    secret_file.write_text("\n")
    result = run(redis_script(compose()), wait=True)
    assert result.returncode == 1 and "redis_password secret is missing or empty" in result.stderr
    secret_file.unlink()
    assert run(redis_script(compose()), wait=True).returncode == 1


# -- the code that puts the password into the Redis URL -----------------------------------------
def test_redis_url_takes_the_password_from_the_file(monkeypatch, tmp_path):
    """Percent-encoded, so that redis-py and Celery (kombu) read back the exact password."""
    from kombu import Connection

    from worker.celery_app import make_app, redis_url

    password = "p@ss:w/rd%#?&"
    (tmp_path / "pw").write_text(password + "\n")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/3")
    monkeypatch.delenv("REDIS_PASSWORD_FILE", raising=False)
    assert redis_url() == "redis://redis:6379/3"  # no file named: the URL as given
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    url = redis_url()
    kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == (password, "redis", 6379, 3)
    assert Connection(url).password == password
    assert make_app().connection_for_write().password == password
    monkeypatch.setenv("REDIS_URL", "rediss://worker@redis:6380/0")
    kwargs = redis.Redis.from_url(redis_url()).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["port"]) == ("worker", password, 6380)


@pytest.mark.parametrize("text, url, message", [
    (None, "redis://redis:6379/0", "cannot read the Redis password file"),
    ("", "redis://redis:6379/0", "must hold one line of text without spaces"),
    ("\n", "redis://redis:6379/0", "must hold one line of text without spaces"),
    ("two words\n", "redis://redis:6379/0", "must hold one line of text without spaces"),
    ("crlf\r\n", "redis://redis:6379/0", "must hold one line of text without spaces"),
    ("one\ntwo\n", "redis://redis:6379/0", "must hold one line of text without spaces"),
    ("good\n", "redis://:inline@redis:6379/0", "keep the password in the file only"),
    ("good\n", "unix:///run/redis.sock", "needs a redis:// or rediss:// REDIS_URL"),
])
def test_redis_url_refuses_a_bad_password_file(monkeypatch, tmp_path, text, url, message):
    """A mistake is one clear error, never a silent "no password" (which Redis would refuse later
    with NOAUTH) nor a password that differs from the one the redis service read."""
    from worker.celery_app import redis_url

    path = tmp_path / "pw"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(path))
    with pytest.raises(ReidgenError, match=message) as err:
        redis_url()
    assert "inline" not in str(err.value)  # the URL's own password is never echoed


# -- the CPU / registry-less override (docker-compose.cpu.yml) and the image build ---------------
# Run for real by docker/e2e.sh (`make compose-e2e`, needs Docker); checked here offline.
CPU_FILE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CUDA_BASE = re.compile(r"pytorch/pytorch:[\w.-]*cuda[\w.-]*")


class _Reset:  # Compose's `!reset`: drop the value of the files before
    pass


class _Override:  # Compose's `!override`: replace the value of the files before, no merging
    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    return _Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!override", _construct_override)


def merge(base, over):
    """Compose's merge of a later file into an earlier one, as far as these files need it:
    mappings merge key by key, `!reset` removes, `!override` and everything else replace."""
    if isinstance(over, _Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value)
        return out
    return over


def cpu_override() -> dict:
    return yaml.load(interpolate(CPU_FILE.read_text()), Loader=ComposeLoader)


def cpu_compose() -> dict:
    return merge(compose(), cpu_override())


def test_the_merge_follows_compose():
    """The stand-in for Compose's merge is not vacuous."""
    base = {"a": {"x": 1, "y": [1]}, "b": {"deploy": {"r": 1}, "k": 2}}
    over = yaml.load("a: {y: [2], z: 3}\nb: {deploy: !reset {}}\nc: !override [1]\n", Loader=ComposeLoader)
    assert merge(base, over) == {"a": {"x": 1, "y": [2], "z": 3}, "b": {"k": 2}, "c": [1]}


def test_cpu_override_is_valid_and_reserves_no_gpu():
    doc = cpu_compose()
    # build.secrets is newer than the 2021 schema kept in docker/ (Compose v2 reads it; e2e.sh runs
    # `docker compose config` on these files): validated without it.
    older = json.loads(json.dumps(doc))
    for svc in older["services"].values():
        svc.get("build", {}).pop("secrets", None)
    assert schema_errors(older) == []
    text = json.dumps(doc["services"])  # (the x-gpu anchor of docker-compose.yml stays, unused)
    assert "nvidia" not in text, "a GPU reservation is left on the CPU override"
    for name, svc in doc["services"].items():
        assert "devices" not in json.dumps(svc.get("deploy", {})) and "runtime" not in svc, name
    assert set(doc["services"]) == set(compose()["services"]), "the override adds or drops services"


def test_cpu_override_changes_only_the_base_gpus_and_redis():
    """Secrets, volumes, health checks, commands and environment stay docker-compose.yml's: what
    e2e.sh runs on the CPU is the lab's deployment."""
    base, merged = compose(), cpu_compose()
    allowed = {"build", "deploy", "image"}
    for name, svc in merged["services"].items():
        for key in set(svc) | set(base["services"][name]):
            if key not in allowed:
                assert svc.get(key) == base["services"][name].get(key), f"{name}.{key} differs on the CPU"
    for name in ("api", "worker", "trainer", "flower"):
        build, base_build = merged["services"][name]["build"], base["services"][name]["build"]
        assert {k: v for k, v in build.items() if k not in ("args", "secrets")} == base_build, name
        assert build["args"]["BASE_IMAGE"] == "reidgen-base:bookworm", name  # docker/local-base.sh's default
        assert merged["services"][name]["image"] == base["services"][name]["image"], name
    # Top level: one more secret, the CA bundle the builds use (no service mounts it).
    base_secrets, merged_secrets = base.pop("secrets"), merged.pop("secrets")
    assert {k: v for k, v in merged_secrets.items() if k != "ca_bundle"} == base_secrets
    outside = {k: v for k, v in merged.items() if k != "services" and not k.startswith("x-")}
    assert outside == {k: v for k, v in base.items() if k != "services" and not k.startswith("x-")}


def test_cpu_override_builds_with_the_ca_bundle_secret():
    """`docker compose -f docker-compose.yml -f docker-compose.cpu.yml build` hands pip the CA
    bundle (default: the host's) as the Dockerfile's `ca_bundle` build secret; no container gets it."""
    doc = cpu_compose()
    assert doc["secrets"]["ca_bundle"] == {"file": "/etc/ssl/certs/ca-certificates.crt"}
    for name, svc in doc["services"].items():
        assert "ca_bundle" not in mounted_secrets(svc).values(), name
        if svc["build"].get("target") != "redis":
            assert svc["build"]["secrets"] == ["ca_bundle"], name
    assert "id=ca_bundle" in DOCKERFILE.read_text()


def test_local_base_script_makes_the_image_the_override_names():
    script = (REPO / "docker" / "local-base.sh").read_text()
    assert re.search(r'IMAGE="\$\{1:-reidgen-base:bookworm\}"', script)
    packages = re.search(r"^PACKAGES=(\S+)", script, re.M).group(1).split(",")
    # python/pip for the reidgen stage (python-is-python3: `python` as the Dockerfile and the health
    # checks call it), useradd (passwd), redis-server and redis-cli (the redis stage and its probe).
    assert {"python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd",
            "redis-server", "redis-tools"} <= set(packages)
    assert "debootstrap --variant=minbase" in script and "docker import" in script
    assert subprocess.run(["sh", "-n", str(REPO / "docker" / "local-base.sh")]).returncode == 0


def test_redis_on_the_cpu_override_is_built_from_the_local_base():
    """No registry: redis is the Dockerfile's `redis` stage (Debian's redis-server), which has the
    docker-entrypoint.sh that docker-compose.yml's redis command execs."""
    redis_svc = cpu_compose()["services"]["redis"]
    build = redis_svc["build"]
    assert (build["context"], build["dockerfile"], build["target"]) == (".", "docker/Dockerfile", "redis")
    assert build["args"]["REDIS_BASE_IMAGE"] == "reidgen-base:bookworm"
    assert not redis_svc["image"].startswith("redis:"), "the override must not pull redis from Docker Hub"
    stage = dockerfile_stages(DOCKERFILE)["redis"]
    assert stage["base"] == "${REDIS_BASE_IMAGE}" and stage["entrypoint"] == ["docker-entrypoint.sh"]
    copy = re.search(r"^COPY (docker/\S+) /usr/local/bin/docker-entrypoint\.sh$", DOCKERFILE.read_text(), re.M)
    assert copy and (REPO / copy.group(1)).exists()
    assert "docker/redis-entrypoint.sh" == copy.group(1)
    assert re.search(r"\bexec docker-entrypoint\.sh redis-server\b", redis_script(cpu_compose()))


def test_redis_entrypoint_runs_other_commands_as_given(tmp_path):
    """Only `redis-server` started as root is switched to the redis user; anything else (a shell in
    the container, redis-cli) runs as given, with its arguments intact."""
    entrypoint = str(REPO / "docker" / "redis-entrypoint.sh")
    result = subprocess.run(["sh", entrypoint, "sh", "-c", 'echo "$0|$1"', "a b", "c"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=10)
    assert (result.returncode, result.stdout) == (0, "a b|c\n"), result.stderr
    script = (REPO / "docker" / "redis-entrypoint.sh").read_text()
    assert re.search(r'exec setpriv --reuid=redis --regid=redis --init-groups "\$@"', script)


# -- the image build: base image argument, CA bundle secret -----------------------------------------
def dockerfile_args() -> dict[str, str]:
    """The ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    head = text[:re.search(r"^FROM ", text, re.M).start()]
    return dict((m.group(1), m.group(2)) for m in re.finditer(r"^ARG (\w+)=(\S*)", head, re.M))


def test_base_image_is_a_build_argument_defaulting_to_the_cuda_pytorch_image():
    args = dockerfile_args()
    assert CUDA_BASE.fullmatch(args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert dockerfile_stages(DOCKERFILE)["reidgen"]["base"] == "${BASE_IMAGE}"
    assert "args" not in compose()["services"]["api"]["build"]  # labs get the default: CUDA


def test_the_ca_bundle_is_a_build_secret_never_baked_in():
    """Every pip install of the build runs with the optional `ca_bundle` secret mounted, through
    docker/pip.sh; no instruction copies a certificate into the image or points pip at one."""
    stages = dockerfile_stages(DOCKERFILE)
    pip_runs = [run for s in stages.values() for run in s["run"] if "pip" in run]
    assert len(pip_runs) >= 3
    for run in pip_runs:
        assert run.startswith("--mount=type=secret,id=ca_bundle "), run
        assert not re.search(r"(?<![\w-])pip install", run), f"pip without the CA secret: {run}"
        assert "required" not in run.split()[0], "the secret must stay optional"
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY docker/pip\.sh /usr/local/bin/reidgen-pip$", text, re.M)
    assert not re.search(r"(?i)^(COPY|ADD)\s.*(\.crt|\.pem|ca-cert|ca_bundle)", text, re.M)
    for stage in stages.values():
        assert not {"PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"} & set(stage["env"])


def _fake_python(folder: Path, certifi: Path, seen: Path) -> None:
    """A `python` for docker/pip.sh: `-c ...certifi...` prints a stand-in certifi bundle, `-m pip`
    records $PIP_CERT's path and contents."""
    _stub(folder, "python", f'''case "$1" in
  -c) echo "{certifi}" ;;
  -m) {{ echo "cert=${{PIP_CERT:-none}}"; echo "args=$*"; [ -z "${{PIP_CERT:-}}" ] || cat "$PIP_CERT"; }} > "{seen}" ;;
esac''')


def test_pip_wrapper_adds_the_secret_to_pips_bundle_and_removes_the_copy(tmp_path):
    bin_dir, certifi, secret, seen = tmp_path / "bin", tmp_path / "certifi.pem", tmp_path / "ca", tmp_path / "seen"
    bin_dir.mkdir()
    certifi.write_text("CERTIFI\n")
    _fake_python(bin_dir, certifi, seen)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CA_BUNDLE_SECRET": str(secret),
           "TMPDIR": str(tmp_path)}
    env.pop("PIP_CERT", None)
    wrapper = str(REPO / "docker" / "pip.sh")
    # No secret: plain pip.
    assert subprocess.run(["sh", wrapper, "install", "x"], env=env, timeout=10).returncode == 0
    assert seen.read_text().splitlines()[:2] == ["cert=none", "args=-m pip install x"]
    # With the secret: pip's bundle plus the extra certificates, in a file gone afterwards.
    secret.write_text("PROXY-CA\n")
    assert subprocess.run(["sh", wrapper, "install", "x"], env=env, timeout=10).returncode == 0
    lines = seen.read_text().splitlines()
    cert = Path(lines[0].removeprefix("cert="))
    assert lines[2:] == ["CERTIFI", "PROXY-CA"]
    assert cert.parent == Path("/tmp") or cert.parent == tmp_path
    assert not cert.exists(), "the combined bundle must be removed when pip ends"


# -- the end-to-end script and its make target ---------------------------------------------------
def test_e2e_script_parses_and_is_not_part_of_make_test():
    e2e = REPO / "docker" / "e2e.sh"
    assert subprocess.run(["bash", "-n", str(e2e)]).returncode == 0
    assert os.access(e2e, os.X_OK) and os.access(REPO / "docker" / "local-base.sh", os.X_OK)
    makefile = (REPO / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w-]+):([^\n=]*)$", makefile, re.M))
    assert "docker/e2e.sh" in makefile.split("\ncompose-e2e:", 1)[1].split("\n\n")[0]
    assert "compose-e2e" not in targets["test"] and "e2e" not in makefile.split("\ntest:", 1)[1].split("\n\n")[0]
    text = e2e.read_text()
    # It tears down what it started (containers and volumes) and talks to loopback only.
    assert re.search(r"down -v\b", text) and "trap cleanup EXIT" in text
    assert re.findall(r"http://([\w.]+):", text) == ["127.0.0.1"] * len(re.findall(r"http://([\w.]+):", text))
    assert re.search(r"^export API_PORT=127\.0\.0\.1:8000$", text, re.M)  # the api on loopback only


# -- the deployment page's command blocks: what the e2e runs ----------------------------------------------
PAGE = REPO / "docs" / "deployment.md"


@functools.cache
def page_blocks():
    spec = importlib.util.spec_from_file_location("page_blocks", REPO / "docker" / "page_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["page_blocks"] = module  # (its dataclass looks its module up there)
    spec.loader.exec_module(module)
    return module


def page_commands(block) -> list[str]:
    """The commands of a block, one a line: continuation lines joined, comments and blanks dropped."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_command_block_of_the_deployment_page_is_marked():
    """Each shell block is either run by the e2e under a name or says why not: a new block cannot
    slip past the e2e unnoticed."""
    shell = [b for b in page_blocks().blocks(PAGE.read_text()) if b.lang in ("bash", "sh", "shell", "console")]
    unmarked = [b.line for b in shell if not b.name and not b.skip]
    assert not unmarked, ("docs/deployment.md: shell blocks without <!-- e2e: NAME --> or "
                          f"<!-- e2e: skip, WHY --> at lines {unmarked}")
    assert len([b for b in shell if b.name]) >= 8


def test_the_e2e_runs_the_pages_blocks_in_the_pages_order():
    """docker/e2e.sh follows the page: its `run_block NAME` lines are the page's marked blocks, each
    once, in the page's order; it runs them as extracted, with no copy of their commands."""
    page = [b.name for b in page_blocks().steps(PAGE.read_text())]
    e2e = re.findall(r"^run_block ([\w-]+)", (REPO / "docker" / "e2e.sh").read_text(), re.M)
    assert e2e == page


def test_the_block_extractor_reads_markers_and_refuses_duplicates(tmp_path):
    pb = page_blocks()
    text = ("<!-- e2e: one -->\n```bash\necho 1\n```\n\n<!-- e2e: skip, slow -->\n\n```bash\nsleep 9\n```\n"
            "text\n\n```bash\nunmarked\n```\n<!-- e2e: two -->\nsome prose\n```bash\nnot two\n```\n")
    blocks = pb.blocks(text)
    assert [(b.name, b.skip, b.text) for b in blocks] == [
        ("one", None, "echo 1\n"), (None, "slow", "sleep 9\n"), (None, None, "unmarked\n"), (None, None, "not two\n")]
    with pytest.raises(ValueError, match="twice"):
        pb.steps(text + "<!-- e2e: one -->\n```bash\necho 2\n```\n")
    page = tmp_path / "page.md"
    page.write_text(text)
    run = lambda *a: subprocess.run(["python3", str(REPO / "docker" / "page_blocks.py"), str(page), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    assert run().stdout == "one\n"
    assert run("one").stdout == "echo 1\n"
    assert run("two").returncode == 1


def test_the_pages_blocks_parse_and_assume_nothing_a_new_user_lacks():
    """Every block the e2e runs parses with bash; none needs sudo or a placeholder to fill in; every
    `docker compose` command takes its files from .env (COMPOSE_FILE), never from -f."""
    for block in page_blocks().steps(PAGE.read_text()):
        assert subprocess.run(["bash", "-n"], input=block.text, text=True).returncode == 0, block.name
        for command in page_commands(block):
            assert not re.search(r"\bsudo\b", command), (block.name, command)
            assert "..." not in command and "JOB_ID" not in command, (block.name, command)
            if "docker compose" in command:
                assert not re.search(r"docker compose .*(^|\s)(-f|--file)\s", command), (block.name, command)


def test_the_pages_trainer_commands_parse_with_the_cli():
    """`docker compose run --rm trainer ARGS` on the page: ARGS is a `reidgen` command line."""
    seen = 0
    for block in page_blocks().blocks(PAGE.read_text()):
        for command in page_commands(block):
            m = re.match(r"docker compose run --rm trainer (.+)$", command)
            if m:
                parse_reidgen(shlex.split(m.group(1)))
                seen += 1
    assert seen >= 6


def test_the_pages_down_names_every_profile_and_its_ports_are_the_defaults():
    """`down` stops only the services of the profiles it names (a Flower left running otherwise);
    the curl commands use the ports docker-compose.yml publishes by default."""
    profiles = {p for svc in compose()["services"].values() for p in svc.get("profiles", [])}
    commands = [c for b in page_blocks().steps(PAGE.read_text()) for c in page_commands(b)]
    downs = [c for c in commands if re.match(r"docker compose .*\bdown\b", c)]
    assert downs and any(" -v" in c for c in downs)
    for command in downs:
        assert set(re.findall(r"--profile (\S+)", command)) == profiles, command
    env = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    ports = set(re.findall(r"https?://(?:localhost|127\.0\.0\.1):(\d+)", PAGE.read_text()))
    assert ports == {env["API_PORT"], env["FLOWER_PORT"]}
    assert "COMPOSE_FILE=docker-compose.yml:docker-compose.cpu.yml" in page_blocks().steps(PAGE.read_text())[0].text
