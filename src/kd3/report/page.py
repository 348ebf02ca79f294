"""Report sections and the one HTML page that shows them (inline CSS, relative image links)."""
from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any


@dataclass
class Picture:
    file: str  # a PNG in the report folder, linked by its bare name so the folder can be moved
    caption: str
    after: str = ""  # escaped HTML shown under the picture (e.g. its counts table)


@dataclass
class Section:
    title: str
    pictures: list[Picture] = field(default_factory=list)
    body: str = ""  # HTML already escaped by the helpers below
    note: str = ""  # one line: why the section is empty or partial


_STYLE = """
body { font-family: sans-serif; max-width: 1400px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
img { max-width: 100%; border: 1px solid #ddd; } figure { margin: 1em 0; }
figcaption { font-size: .9em; color: #555; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #8a5a00; font-style: italic; } pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
"""


def table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def preformatted(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{escape(title)}</h1><p>{escape(subtitle)}</p>"]
    for section in sections:
        parts.append(f"<section><h2>{escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p class='note'>{escape(section.note)}</p>")
        parts.append(section.body)
        parts.extend(f"<figure><img src='{escape(p.file)}' alt='{escape(p.caption)}'>"
                     f"<figcaption>{escape(p.caption)}</figcaption></figure>{p.after}" for p in section.pictures)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
