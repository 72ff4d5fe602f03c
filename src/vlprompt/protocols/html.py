"""The report's HTML page: one self-contained, offline-readable file (inline CSS, no scripts, no external URLs).

`table_html` turns a header and rows of strings into escaped ``<table>`` markup (`list_html` a list of lines into
``<ul>``); `write_html` puts such tables
(as given: they are already HTML) and the figures (PNG shown, PDF linked when it lies beside it) on
``out_dir/index.html``, referring to every file by a path relative to ``out_dir``.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*(±\s*\d+(\.\d*)?)?%?$")
# A report cell: a number or "–", then the random mark, "(k/n)" runs and "[X]" marks (report.cell).
_REPORT_CELL = re.compile(r"^(?P<value>[^†(\[]*?)†?( \(\d+/\d+\))?( \[[A-Z]\])*( \(paper .*\))?$")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ccc; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.5em; font-size: .9em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .4em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .6em; }
th { background: #f0f0f0; text-align: center; }
td { text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
.tablewrap { overflow-x: auto; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
figcaption { font-size: .9em; color: #555; margin-top: .3em; }
ul.notes { font-size: .85em; color: #444; margin-top: -.8em; }
"""


def table_html(header: list[str], body: list[list[str]], caption: Optional[str] = None) -> str:
    """A ``<table>`` with ``<thead>`` (``header``) and ``<tbody>`` (``body``); every cell goes through html.escape.

    Cells that read as numbers (``71.2``, ``-3.4``, ``63.1 ± 0.8``, ``12%``) get ``class="num"`` (right-aligned).
    """
    lines = ["<table>"]
    if caption is not None:
        lines.append(f"<caption>{html.escape(str(caption))}</caption>")
    lines.append("<thead><tr>" + "".join(f"<th>{html.escape(_cell(c))}</th>" for c in header) + "</tr></thead>")
    lines.append("<tbody>")
    for row in body:
        cells = []
        for c in row:
            text = _cell(c)
            cls = ' class="num"' if _is_number(text.strip()) else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody>")
    lines.append("</table>")
    return "\n".join(lines)


def list_html(items: Iterable[str], cls: Optional[str] = None) -> str:
    """A ``<ul>`` of escaped ``items`` (``class="cls"`` where given); empty when there are none."""
    items = [str(i) for i in items]
    if not items:
        return ""
    attr = f' class="{html.escape(cls)}"' if cls else ""
    return "\n".join([f"<ul{attr}>"] + [f"<li>{html.escape(i)}</li>" for i in items] + ["</ul>"])


def write_html(out_dir: Path, title: str, sections: list[tuple[str, str]], images: list[Path]) -> Path:
    """Write ``out_dir/index.html`` and return its path.

    ``sections`` are (heading, HTML fragment) pairs; the heading is escaped, the fragment (the table code's
    already-escaped ``<table>`` markup) is inserted as is. ``images`` are the figures' PNG files, shown in order
    under "Figures" by a path relative to ``out_dir``, each with a link to the PDF of the same stem beside it
    when that exists. A PDF given in ``images`` is linked rather than shown (and skipped when its PNG is listed
    too); a missing file is left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(str(title))}</h1>",
    ]
    for heading, fragment in sections:
        parts.append("<section>")
        parts.append(f"<h2>{esc(str(heading))}</h2>")
        parts.append(f'<div class="tablewrap">\n{fragment}\n</div>')
        parts.append("</section>")

    figures = list(_figures(out_dir, images))
    if figures:
        parts.append("<section>")
        parts.append("<h2>Figures</h2>")
        parts.extend(figures)
        parts.append("</section>")
    parts.append("</body>")
    parts.append("</html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return page


def _figures(out_dir: Path, images: Iterable[Path]) -> Iterable[str]:
    images = [Path(p) for p in images]
    shown = {p.with_suffix("").resolve() for p in images if p.suffix.lower() != ".pdf" and p.is_file()}
    esc = html.escape
    for img in images:
        if not img.is_file():
            continue
        stem = img.stem
        if img.suffix.lower() == ".pdf":
            if img.with_suffix("").resolve() in shown:
                continue  # linked from its PNG's caption
            yield (f'<figure><figcaption>{esc(stem)}: <a href="{esc(_rel(img, out_dir))}">PDF</a>'
                   "</figcaption></figure>")
            continue
        caption = esc(stem)
        pdf = img.with_suffix(".pdf")
        if pdf.is_file():
            caption += f' (<a href="{esc(_rel(pdf, out_dir))}">PDF</a>)'
        yield (f'<figure><img src="{esc(_rel(img, out_dir))}" alt="{esc(stem)}">'
               f"<figcaption>{caption}</figcaption></figure>")


def _rel(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` as a URL path (forward slashes, percent-encoded)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    return quote(Path(rel).as_posix())


def _is_number(text: str) -> bool:
    """A number as `_NUMBER` reads it, also with a report cell's marks after it (``71.20 ± 0.40† (2/3) [F]``)."""
    if _NUMBER.match(text):
        return True
    found = _REPORT_CELL.match(text)
    return bool(found) and found.group("value") != text and bool(_NUMBER.match(found.group("value").strip()))


def _cell(c) -> str:
    return "" if c is None else str(c)
