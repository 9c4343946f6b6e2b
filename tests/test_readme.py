"""The README's stage map names every module under oikyo_ray/ (one line each) and only those, and
every local link in the README and docs/ resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_stage_map_lists_every_module():
    listed = re.findall(r"^- `([\w/]+\.py)`: \S", README, re.M)
    modules = {str(p.relative_to(ROOT / "oikyo_ray")) for p in (ROOT / "oikyo_ray").rglob("*.py")}
    modules = {m for m in modules if not m.endswith("__init__.py")}
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(modules - set(listed)) == [], "add these to the README's stage map"
    assert sorted(set(listed) - modules) == [], "the README's stage map names modules that do not exist"


def test_stage_map_is_on_the_first_screen():
    head = README[: README.index("## Stage map")]
    assert "pip install" in head and "python -m pytest" in head and len(head.splitlines()) < 40


def test_local_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links {target}, which does not exist"
