"""The documentation: its results pages match bench/results/*.json (bench/results_pages.py), the
README and the docs speak of the project only, and the deployment page's commands fit the compose
files (no sudo, COMPOSE_FILE instead of -f, models before `up`, a `down` that names every profile,
trainer commands that parse). Docker itself is exercised by `make compose-e2e`, not here."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_pages", REPO / "bench" / "results_pages.py")
results_pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_pages)


def test_committed_pages_match_their_json():
    """Regenerate every page and block in memory: each must equal the committed file."""
    stale = [str(path.relative_to(REPO)) for path, text in results_pages.outputs().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"differ from their JSON (run `{results_pages.GENERATOR}`): {stale}"


def test_every_results_file_has_a_page():
    names = {p.stem for p in results_pages.RESULTS.glob("*.json")}
    pages = {p.stem for p in results_pages.OUT.glob("*.md")} - {"index"}
    assert pages == names, "a results file without a page, or a page in docs/results/ that no file makes"
    assert set(results_pages.PAGES) <= names, "a page of the script whose results file is gone"


def test_a_results_file_without_a_page_of_its_own_gets_every_figure():
    body = results_pages.generic({"benchmark": "x", "a": {"b": 1.5, "c": [1, 2]}, "rows": [{"d": None}]})
    assert "| `a.b` | 1.500 |" in body and "| `a.c` | 1, 2 |" in body and "| `rows[0].d` | — |" in body


def test_a_changed_json_changes_its_page(tmp_path, monkeypatch):
    """The check is not vacuous: a figure changed in a JSON shows in the page made from it."""
    src = json.loads((results_pages.RESULTS / "export_size.json").read_text())
    src["results"]["paper"]["size_MiB"]["export"] = 123.4
    (tmp_path / "export_size.json").write_text(json.dumps(src))
    monkeypatch.setattr(results_pages, "RESULTS", tmp_path)
    page = results_pages.page("export_size", results_pages.export_size(results_pages.load("export_size")))
    assert "123.4 MiB" in page
    assert page != (results_pages.OUT / "export_size.md").read_text()


def test_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    out.mkdir()
    monkeypatch.setattr(results_pages, "OUT", out)
    monkeypatch.setattr(results_pages, "DOCS", tmp_path)
    monkeypatch.setattr(results_pages, "REPO", tmp_path)
    assert results_pages.main(["--check"]) == 1
    assert "differs from its JSON" in capsys.readouterr().out
    assert not list(out.iterdir()), "--check wrote a file"


def test_an_unknown_block_is_refused():
    with pytest.raises(SystemExit, match="unknown results block"):
        results_pages.fill_blocks("<!-- results: nope -->\nx\n<!-- /results -->\n", "page.md")


def _docs_text() -> list[tuple[Path, str]]:
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "mkdocs.yml"]
    return [(p, p.read_text()) for p in files]


def test_the_docs_speak_of_the_project_only():
    """No word of how the project was made, no machine of its own, no absolute path of one."""
    words = re.compile(r"\bsessions?\b|\bthis machine\b|\bthis CPU\b|/work/|/home/\w+|/root/", re.I)
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p, text in _docs_text()
             for i, line in enumerate(text.splitlines(), 1) if words.search(line)]
    assert not found, "\n".join(found)


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


# -- the deployment page: its commands checked against the compose files, offline -----------------
DEPLOYMENT = REPO / "docs" / "deployment.md"


def _deployment_steps() -> list[tuple[str, list[str]]]:
    """(heading, command lines) of each `## ...` section's bash blocks, continuation lines joined."""
    steps, block = [("", [])], None
    for line in DEPLOYMENT.read_text().splitlines():
        if block is None and line.startswith("## "):
            steps.append((line[3:], []))
        elif block is None and line.startswith("```bash"):
            block = []
        elif block is not None and line.startswith("```"):
            text = re.sub(r"\\\n\s*", " ", "\n".join(block))
            steps[-1][1].extend(c for c in text.splitlines() if c.strip())
            block = None
        elif block is not None:
            block.append(line)
    return steps


def _compose_commands() -> list[list[str]]:
    """Each `docker compose ...` command of the page, as its words (comments and `&& ...` cut)."""
    out = []
    for _, lines in _deployment_steps():
        for line in lines:
            line = line.split("  #", 1)[0].strip()
            if line.startswith("docker compose"):
                out.append(shlex.split(line.split("&&")[0]))
    return out


def _compose_file(name: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!reset", lambda loader, node: None)
    Loader.add_constructor("!override", lambda loader, node: None)
    return yaml.load((REPO / name).read_text(), Loader=Loader)


def test_deployment_steps_assume_no_sudo_and_no_f_files():
    """COMPOSE_FILE in .env names the files once; nothing is run with sudo."""
    lines = [line for _, ls in _deployment_steps() for line in ls]
    assert not [line for line in lines if re.search(r"(^|\s)sudo\s", line)]
    named_files = [c for c in _compose_commands() for i, word in enumerate(c[:-1])
                   if word in ("-f", "--file") and c[i + 1].endswith((".yml", ".yaml"))]
    assert not named_files, "a command names its compose files instead of COMPOSE_FILE"
    text = DEPLOYMENT.read_text()
    files = re.search(r"COMPOSE_FILE=([\w.:-]+)", text).group(1).split(":")
    assert all((REPO / f).exists() for f in files), files


def test_deployment_names_only_services_and_profiles_that_exist():
    services = _compose_file("docker-compose.yml")["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    for cmd in _compose_commands():
        named = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--profile"}
        assert named <= profiles, cmd
        if "run" in cmd:
            assert cmd[cmd.index("--rm") + 1 if "--rm" in cmd else cmd.index("run") + 1] in services or \
                "--entrypoint" in cmd, cmd


def test_down_stops_every_profile():
    services = _compose_file("docker-compose.yml")["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    downs = [c for c in _compose_commands() if "down" in c]
    assert downs
    for cmd in downs:
        assert {cmd[i + 1] for i, a in enumerate(cmd) if a == "--profile"} == profiles, cmd


def test_models_are_prepared_before_the_service_starts():
    first_up = first_model = None
    for i, (_, lines) in enumerate(_deployment_steps()):
        for line in lines:
            if first_model is None and re.search(r"\bmodels/|--out /models/", line):
                first_model = i
            if first_up is None and re.search(r"docker compose up\b", line):
                first_up = i
    assert first_model is not None and first_up is not None and first_model < first_up


def test_the_cpu_override_takes_torch_index_url_from_env():
    text = (REPO / "docker-compose.cpu.yml").read_text()
    assert re.search(r"TORCH_INDEX_URL: \$\{TORCH_INDEX_URL:-\}", text)
    assert "TORCH_INDEX_URL=" in DEPLOYMENT.read_text()


def test_trainer_commands_of_the_deployment_parse():
    from reidgen.cli import build_parser

    seen = 0
    for cmd in _compose_commands():
        if cmd[:4] == ["docker", "compose", "run", "--rm"] and cmd[4] == "trainer" and "..." not in cmd:
            build_parser().parse_args(cmd[5:])
            seen += 1
    assert seen >= 5
