"""The README and docs/ link only to files that exist (docs the code cites live in the repository)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_point_to_existing_files(doc):
    missing = []
    text = re.sub(r"`[^`\n]*`", "", doc.read_text())        # code spans are not links
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_code_cites_docs_that_exist():
    """Docstrings and comments cite docs/*.md by name: each cited file is in docs/."""
    cited = set()
    for path in [*ROOT.glob("calrft_kernels/**/*.py"), *ROOT.glob("python/calrft/**/*.py"),
                 *ROOT.glob("csrc/**/*.*")]:
        cited |= set(re.findall(r"docs/([A-Za-z0-9_\-]+\.md)", path.read_text(errors="ignore")))
    assert cited, "no citation found: the pattern is stale"
    missing = sorted(name for name in cited if not (ROOT / "docs" / name).exists())
    assert not missing, f"code cites docs that are not in the repository: {missing}"
