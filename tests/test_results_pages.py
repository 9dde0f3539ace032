"""The documentation's results pages match bench/results/*.json (bench/results_pages.py), and the
README and the docs speak of the project only."""

import importlib.util
import json
import re
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
