"""HTML parts: rendered to text for the agent, sanitised for display."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import nh3

# --- HTML -------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "ul", "ol", "table", "blockquote", "section", "article",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "hr", "header", "footer", "dd", "dt",
}  # fmt: skip
# Elements that start a new line but do not end a paragraph.
_LINE_TAGS = {"br", "li", "tr"}
_SANITIZE_DROPPED_CONTENT = {"script", "style", "title"}
_SKIPPED_TAGS = {"script", "style", "head", "title", "noscript", "template"}


class _TextRenderer(HTMLParser):
    """Renders HTML as plain text: block elements become line breaks, scripts and styles vanish."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS or tag in _LINE_TAGS:
            self.chunks.append("\n")
            if tag == "li":
                self.chunks.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.chunks.append(data)

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.chunks).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """A plain-text rendering of an HTML body, for messages that have no text part."""
    renderer = _TextRenderer()
    try:
        renderer.feed(html)
        renderer.close()
    except (AssertionError, ValueError):
        # Very broken markup: let nh3 drop every tag instead.
        return " ".join(nh3.clean(html, tags=set()).split())
    return renderer.text()


def sanitize_html(html: str) -> str:
    """HTML safe to show an agent: nh3's defaults (no scripts, no event handlers)."""
    # nh3 keeps the text of <title> by default; in a mail body it is noise.
    return nh3.clean(html, clean_content_tags=_SANITIZE_DROPPED_CONTENT).strip()
