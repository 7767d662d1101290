"""Reading rendered pages as a person sees them."""

from __future__ import annotations

from html.parser import HTMLParser

HOSTILE = "<script>alert('x')</script>"  # a class, label or file name that must stay text
INLINE = {"b", "code"}  # no word break at these tags


class Text(HTMLParser):
    """The page's visible text (outside <style>), whitespace-normalised, and its <img> sources."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.images: list[str] = []
        self._style = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._style = tag == "style"
        if tag not in INLINE:
            self.parts.append(" ")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag: str) -> None:
        self._style = False
        if tag not in INLINE:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._style:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())


def visible(page: str) -> str:
    parser = Text()
    parser.feed(page)
    return parser.text
