"""README's Python snippets run exactly as printed (in order, in one namespace, as a reader would paste them into one
interpreter), and its relative links point at files of the repository."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(_python_blocks()) >= 4


def test_readme_python_snippets_run_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the persistence snippet writes stream.safetensors into the working directory
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(_python_blocks()):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "stream.safetensors").is_file()
    assert namespace["ids"].shape == (2, 1 + 20)


def _relative_links(page: Path = README) -> list[str]:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    return sorted({link for link in links if not re.match(r"[a-z]+://|mailto:", link)})


@pytest.mark.parametrize("link", _relative_links())
def test_readme_relative_links_exist(link):
    assert (README.parent / link).exists(), f"README links to {link}, which does not exist"


DOC_LINKS = [(page, link) for page in sorted((README.parent / "docs").rglob("*.md")) for link in _relative_links(page)]


@pytest.mark.parametrize("page,link", DOC_LINKS, ids=[f"{p.name}:{link}" for p, link in DOC_LINKS])
def test_docs_relative_links_exist(page, link):
    assert (page.parent / link).exists(), f"{page.relative_to(README.parent)} links to {link}, which does not exist"
