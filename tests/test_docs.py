"""The documentation (docs/, Sphinx): it builds with warnings as errors, the API pages document every public name by
its public path, and the ``>>>`` examples written in the pages run and print what the pages say."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: the public modules whose ``__all__`` the API pages must cover
PUBLIC_MODULES = (
    "lightning_mtl",
    "lightning_mtl.callbacks",
    "lightning_mtl.engine",
    "lightning_mtl.scalarize",
    "lightning_gen",
    "lightning_gen.cosent",
    "lightning_gen.ddpm",
    "lightning_gen.gau",
    "lightning_mtl.losses",
    "lightning_mtl.heads",
    "lightning_gen.span",
)


def _needs_the_model_extras() -> None:
    """The API pages document the models, whose modules import diffusers (``gen``) and transformers (``nlp``)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


_DIRECTIVE = re.compile(r"^\.\. (auto(?:class|function|data|module)|py:(?:data|module|currentmodule)):: (\S+)", re.M)


def _documented_objects() -> dict[int, str]:
    """``id(object) -> documented path`` of every object that an API page documents."""
    found: dict[int, str] = {}
    for page in sorted((DOCS / "api").glob("*.rst")):
        module = None
        for kind, target in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            if kind in ("py:module", "automodule", "py:currentmodule"):
                module = target
                continue
            path = target if kind.startswith("auto") or "." in target else f"{module}.{target}"
            owner, name = path.rsplit(".", 1)
            found[id(getattr(importlib.import_module(owner), name))] = path
    return found


def test_every_public_name_has_a_section_in_the_api_pages():
    _needs_the_model_extras()
    documented = _documented_objects()
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{n}" for n in module.__all__ if id(getattr(module, n)) not in documented]
    assert not missing, f"public names without a section in docs/api/*.rst: {missing}"


def _examples(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    # A markdown code fence closes the example before it: make it a blank line for doctest.
    return re.sub(r"^```.*$", "", text, flags=re.M) if page.suffix == ".md" else text


_PAGES = sorted(p for p in DOCS.rglob("*") if p.suffix in (".md", ".rst") and "_build" not in p.parts)
_EXAMPLE_PAGES = [p for p in _PAGES if ">>>" in p.read_text(encoding="utf-8")]


@pytest.mark.slow
@pytest.mark.parametrize("page", _EXAMPLE_PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_examples_in_the_pages_run(page: Path):
    _needs_the_model_extras()
    parser = doctest.DocTestParser()
    test = parser.get_doctest(_examples(page), {}, str(page.relative_to(ROOT)), str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    """``python -m sphinx -W --keep-going -b html docs docs/_build/html``, into a temporary folder. In a separate
    process: Sphinx's autodoc leaves the importing process changed (jsonargparse then rejects ``2.0`` as a float in
    LightningCLI configs), which would break the tests that run after it."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    _needs_the_model_extras()
    html, doctrees = tmp_path / "html", tmp_path / "doctrees"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(doctrees), str(DOCS)]
    result = subprocess.run([*cmd, str(html)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (html / "index.html").is_file()
    assert (html / "api" / "lightning_mtl.html").is_file()
