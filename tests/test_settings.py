"""Every environment variable is a field of a settings class in reidgen/core/settings.py (issue 16):
no other module reads the environment, a bad value is one line naming the variable, the README's
table is the classes', and `reidgen worker` hands its flags to its pool as settings, not through
``os.environ``."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from reidgen.cli import main
from reidgen.core.settings import (
    ALL_SETTINGS,
    REQUEST_TIMEOUT_S,
    CommonSettings,
    ServiceSettings,
    SettingsError,
    TorchrunSettings,
    WorkerSettings,
    env_names,
    env_table,
)

REPO = Path(__file__).resolve().parents[1]
CODE = ("reidgen", "api_schemas", "generator_service", "worker", "trainer", "docker", "bench")
SETTINGS_HOME = REPO / "reidgen" / "core"


def _is_os(node: ast.AST, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def environment_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) of each use of the environment other than handing a copy to a child process
    (``{**os.environ, ...}``, ``os.environ.copy()``, ``dict(os.environ, ...)``): reads and writes alike."""
    handed_on: set[int] = set()  # ids of os.environ nodes that are only copied for a child
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            handed_on.update(id(v) for k, v in zip(node.keys, node.values) if k is None and _is_os(v, "environ"))
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "copy" and _is_os(node.func.value, "environ"):
                handed_on.add(id(node.func.value))
            if isinstance(node.func, ast.Name) and node.func.id == "dict" and node.args and _is_os(node.args[0],
                                                                                                     "environ"):
                handed_on.add(id(node.args[0]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [(node.lineno, f"from os import {a.name}") for a in node.names
                      if a.name in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")]
        elif any(_is_os(node, name) for name in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")):
            if id(node) not in handed_on:
                found.append((node.lineno, f"os.{node.attr}"))
    return found


def test_the_scan_sees_reads_writes_and_allows_handing_on():
    code = ("import os\nfrom os import getenv\na = os.environ.get('X')\nb = os.getenv('Y')\nos.environ['Z'] = '1'\n"
            "c = 'W' in os.environ\nchild = {**os.environ, 'K': '1'}\nalso = os.environ.copy()\n")
    assert sorted(line for line, _ in environment_uses(ast.parse(code))) == [2, 3, 4, 5, 6]


def test_no_module_outside_reidgen_core_uses_the_environment():
    offenders = []
    for package in CODE:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.is_relative_to(SETTINGS_HOME):
                continue
            for line, what in environment_uses(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not offenders, "read the environment through reidgen.core.settings instead:\n" + "\n".join(offenders)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REIDGEN_DATA", str(tmp_path))
    monkeypatch.setenv("REIDGEN_REDIS_RETRY_S", "2.5")
    monkeypatch.setenv("REIDGEN_QUEUE", "q-from-env")
    monkeypatch.setenv("REIDGEN_LEASE_S", "")  # empty means unset, as in a shell
    monkeypatch.setenv("REIDGEN_REQUEST_TIMEOUT_S", "12")
    monkeypatch.setenv("REIDGEN_API_KEY", "k3y")
    monkeypatch.setenv("WORLD_SIZE", "4")
    worker = WorkerSettings.from_env()
    assert (worker.data_root, worker.redis_retry_s, worker.queue, worker.lease_s) == (tmp_path, 2.5, "q-from-env", 30)
    assert CommonSettings.from_env().data_root == tmp_path
    service = ServiceSettings.from_env()
    assert service.request_timeout_s == 12 and service.api_key.get_secret_value() == "k3y"
    assert "k3y" not in repr(service)  # a secret stays out of logs
    assert TorchrunSettings.from_env().world_size == 4
    # Flags (fields by name) go over the environment; None means "not given".
    assert WorkerSettings.from_env(queue="q-flag", lease_s=None).queue == "q-flag"
    assert not WorkerSettings.from_env().redis_url_is_set or os.environ.get("REDIS_URL")


def test_the_modules_read_their_settings(monkeypatch, tmp_path):
    from generator_service.http import Settings
    from generator_service.http.serve import read_api_key
    from reidgen.core.paths import data_root
    from worker.celery_app import make_app, queue_name, redis_retry_s, shard_time_limits

    monkeypatch.setenv("REIDGEN_DATA", str(tmp_path))
    monkeypatch.setenv("REIDGEN_QUEUE", "q-env")
    monkeypatch.setenv("REIDGEN_REDIS_RETRY_S", "3")
    monkeypatch.setenv("REIDGEN_SECONDS_PER_IMAGE", "1")
    monkeypatch.setenv("REIDGEN_VISIBILITY_TIMEOUT", "99")
    monkeypatch.setenv("REIDGEN_LEASE_S", "40")
    monkeypatch.setenv("REIDGEN_API_KEY", " k3y ")
    assert data_root() == tmp_path and queue_name() == "q-env" and redis_retry_s() == 3
    assert shard_time_limits(10) == (130, 190)
    assert make_app().conf.broker_transport_options["visibility_timeout"] == 99
    assert read_api_key() == "k3y"
    settings = Settings.from_env()
    assert settings.lease_s == 40 and settings.data_root == tmp_path.resolve()
    assert settings.request_timeout_s == REQUEST_TIMEOUT_S == Settings().request_timeout_s


def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch):
    from worker.celery_app import redis_retry_s

    monkeypatch.setenv("REIDGEN_REDIS_RETRY_S", "abc")
    with pytest.raises(SettingsError) as caught:
        redis_retry_s()
    message = str(caught.value)
    assert "\n" not in message
    assert "REIDGEN_REDIS_RETRY_S = 'abc'" in message and "valid number" in message and "0 or more" in message
    monkeypatch.setenv("REIDGEN_REDIS_RETRY_S", "-1")
    with pytest.raises(SettingsError, match=r"REIDGEN_REDIS_RETRY_S = '-1': input should be greater than or equal"):
        redis_retry_s()
    # A flag's value is named by its setting, with the variable it stands for.
    monkeypatch.delenv("REIDGEN_REDIS_RETRY_S")
    with pytest.raises(SettingsError, match=r"^lease_s \(REIDGEN_LEASE_S\) = -2\.0: input should be greater than 0"):
        WorkerSettings.from_env(lease_s=-2.0)


def test_the_cli_reports_a_bad_variable_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("REIDGEN_HEARTBEAT_S", "soon")
    assert main(["worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reidgen: error: environment variable REIDGEN_HEARTBEAT_S = 'soon'") and "\n" not in err


def test_worker_flags_reach_the_pool_as_settings_not_environment(monkeypatch, tmp_path):
    """`reidgen worker` installs its flags as `WorkerSettings` before Celery forks the pool (the
    processes inherit them); the environment is left as it was."""
    import worker.celery_app as celery_app

    started = {}
    monkeypatch.setattr(celery_app, "_installed", None)
    monkeypatch.setattr(celery_app.app, "worker_main", lambda argv: started.update(argv=argv))
    before = dict(os.environ)
    try:
        assert main(["worker", "--queue", "q-flag", "--device", "cpu", "--threads", "2", "--lease", "6",
                     "--heartbeat", "2", "--shards-root", str(tmp_path)]) == 0
        installed = celery_app.worker_settings()
        assert (installed.queue, installed.device, installed.torch_threads, installed.lease_s, installed.shards_root) \
            == ("q-flag", "cpu", 2, 6, tmp_path)
        assert celery_app.app.conf.task_default_queue == "q-flag"
        assert "q-flag,q-flag.redo" in started["argv"]
        from worker.tasks import settings

        assert settings().lease_s == 6 and settings().shards_root == tmp_path.resolve()
        assert dict(os.environ) == before
    finally:
        monkeypatch.undo()  # _installed back to None, then the app's configuration back to the environment's
        celery_app.app.conf.update(celery_app._celery_conf(celery_app.worker_settings()))


def test_bad_worker_timings_stop_the_worker_before_it_starts(monkeypatch, capsys):
    import worker.celery_app as celery_app

    monkeypatch.setattr(celery_app, "_installed", None)
    monkeypatch.setattr(celery_app.app, "worker_main", lambda argv: pytest.fail("the worker started"))
    assert main(["worker", "--heartbeat", "30", "--lease", "10"]) == 2
    assert "must be above 0 and below the lease" in capsys.readouterr().err
    assert celery_app._installed is None


def test_every_variable_has_one_setting_and_the_readme_lists_them():
    names = [f.validation_alias for cls in ALL_SETTINGS for name, f in cls.model_fields.items()
             if name in cls.__annotations__]  # declared by the class itself, not inherited
    assert len(names) == len(set(names)), "a variable read by two settings"
    assert set(names) == set().union(*(env_names(cls) for cls in ALL_SETTINGS))
    assert all(f.description for cls in ALL_SETTINGS for f in cls.model_fields.values())
    readme = (REPO / "README.md").read_text()
    assert env_table() in readme, "README's environment table differs: paste `python -m reidgen.core.settings`"
