"""Every relative link in the README and docs/ points at a file or folder that exists in the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(md: Path) -> list[str]:
    links = [m.group(1).split("#")[0] for m in LINK.finditer(md.read_text())]
    return [t for t in links if t and not t.startswith(("http://", "https://", "mailto:"))]


def missing_targets(md: Path) -> list[str]:
    return [t for t in relative_links(md) if not (md.parent / t).exists()]


@pytest.mark.parametrize("md", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(md):
    assert relative_links(md), f"{md} has no relative links: the pattern no longer matches its markdown"
    missing = missing_targets(md)
    assert not missing, f"{md.relative_to(ROOT)} links to missing paths: {missing}"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("x")
    md = tmp_path / "page.md"
    md.write_text("[ok](there.md) [gone](nowhere/README.md#x) [web](https://example.org) [anchor](#status)")
    assert missing_targets(md) == ["nowhere/README.md"]
