"""The documentation's own checks: every relative link of README.md, docs/*.md, slurm/README.md
and CHANGELOG.md reaches a file, and every #anchor a heading of it (GitHub's slugs); the README
stays a front door (at most 200 lines) whose command table names every command."""
import pytest

import re
from pathlib import Path

from hvd_ba.__main__ import COMMANDS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    files = [README, ROOT / "CHANGELOG.md", ROOT / "slurm" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return files


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links by their text, no markup), lowercased, every
    character that is not a letter, digit, underscore, hyphen or space dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text(encoding="utf-8")))
            if not EXTERNAL.match(target)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link of `path` that reaches no file, or no heading of the file it names."""
    problems = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == []


def test_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "other.md").write_text("# A heading, with `code`\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n"
        "[ok](other.md) [ok](other.md#a-heading-with-code) [ok](other.md#same-1) [ok](#top)\n"
        "![ok](other.md) [gone](missing.md) [bad anchor](other.md#nowhere) [bad local](#nowhere)\n"
        "`[not a link](missing-in-code.md)` [web](https://example.com/x.md)\n"
        "```\n[not a link](missing-in-fence.md)\n```\n")
    assert anchors(tmp_path / "other.md") == {"a-heading-with-code", "same", "same-1"}
    assert broken_links(page, tmp_path) == [
        "page.md: (missing.md): no file missing.md",
        "page.md: (other.md#nowhere): no heading #nowhere in other.md",
        "page.md: (#nowhere): no heading #nowhere in page.md",
    ]


def test_slug_follows_github():
    assert slug("Choices, and why") == "choices-and-why"
    assert slug("What `cluster/setup.sh` installs") == "what-clustersetupsh-installs"
    assert slug("Does BA pay off? `python -m hvd_ba sweep`") == "does-ba-pay-off-python--m-hvd_ba-sweep"
    assert slug("Without Horovod: torch only") == "without-horovod-torch-only"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_command_table_names_every_command():
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    named = {m.group(1) for m in re.finditer(r"^\| `([a-z-]+)[^`]*` \|", section, re.M)}
    missing = [name for name in COMMANDS if name not in named]
    assert missing == [], f"README.md's command table lacks {missing}"
