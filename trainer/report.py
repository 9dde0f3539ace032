"""A self-contained HTML report of a run: pictures embedded as data URIs, one file to open or mail.

The demo writes one; any pipeline can, from sections of text, pictures and result tables.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from api_schemas.evaluation import EvaluationReport

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 12px; border: 1px solid #ccc; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
"""


@dataclass
class Section:
    title: str
    text: str = ""
    pictures: list[tuple[Path, str]] = field(default_factory=list)  # (PNG, caption)
    results: list[tuple[str, EvaluationReport]] = field(default_factory=list)  # (row name, report)
    code: str = ""


def _picture(path: Path, caption: str) -> str:
    if not path.is_file():
        return f"<p><em>missing picture: {html.escape(path.name)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def results_table(rows: list[tuple[str, EvaluationReport]]) -> str:
    head = "<tr><th>model</th><th>Rank-1</th><th>Rank-5</th><th>Rank-10</th><th>mAP</th><th>mINP</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(
            f'<td class="num">{100 * v:.2f}</td>' for v in (r.rank1, r.rank5, r.rank10, r.mAP, r.mINP)) + "</tr>"
        for name, r in rows)
    return f"<table>{head}{body}</table>"


def write_report(path: str | Path, title: str, sections: list[Section]) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>written {datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.results:
            parts.append(results_table(s.results))
        parts.extend(_picture(Path(p), c) for p, c in s.pictures)
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
