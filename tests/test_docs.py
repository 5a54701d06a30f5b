"""The documentation (docs/, Sphinx): it builds with warnings as errors, the API pages document every public name by
its public path, and the ``>>>`` examples written in the pages run and print what the pages say."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from html import unescape
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


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """``python -m sphinx -W --keep-going -b html docs docs/_build/html``, into a temporary folder, once for the
    tests below. In a separate process: Sphinx's autodoc leaves the importing process changed (jsonargparse then
    rejects ``2.0`` as a float in LightningCLI configs), which would break the tests that run after it."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("furo")
    _needs_the_model_extras()
    out = tmp_path_factory.mktemp("docs")
    html, doctrees = out / "html", out / "doctrees"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(doctrees), str(DOCS)]
    result = subprocess.run([*cmd, str(html)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return html


def _pages(html: Path) -> dict[str, str]:
    return {p.relative_to(html).as_posix(): p.read_text(encoding="utf-8") for p in sorted(html.rglob("*.html"))}


def _visible_text(page: str) -> str:
    """The text a reader sees outside code blocks: no tags, no <script>/<style>, no <pre> blocks."""
    page = re.sub(r"<(script|style|pre)\b.*?</\1>", " ", page, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", "", page)).split())


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(html: Path):
    assert (html / "index.html").is_file()
    assert (html / "api" / "lightning_mtl.html").is_file()
    assert "fit --config NAME" in (html / "cli.html").read_text(encoding="utf-8"), "smart quotes turned -- into –"


@pytest.mark.slow
def test_theme_search_version_repository_and_copy_button(html: Path):
    """furo, with the search box at the top of the sidebar, the version beside the name, the repository link of
    pyproject.toml's [project.urls], a copy button on code blocks and the custom CSS."""
    repository = re.search(r'^Repository = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    import lightning_mtl

    index = (html / "index.html").read_text(encoding="utf-8")
    assert "styles/furo.css" in index
    assert index.index('class="sidebar-search-container"') < index.index('class="sidebar-tree"'), "search not on top"
    assert re.search(rf'class="sidebar-brand-text">lightning-mtl {re.escape(lightning_mtl.__version__)}<', index)
    assert f'href="{repository}"' in index
    assert "copybutton.js" in index
    assert "custom.css" in index and (html / "_static" / "custom.css").is_file()


@pytest.mark.slow
def test_math_is_rendered_without_a_network(html: Path):
    """Every page with formulas loads MathJax from the built pages themselves; no page loads anything from a CDN."""
    pages = _pages(html)
    with_math = [name for name, page in pages.items() if 'class="math' in page]
    assert len(with_math) >= 5, with_math
    for name in with_math:
        sources = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', pages[name], flags=re.I)
        assert sources, f"{name}: no MathJax script"
        for src in sources:
            assert not re.match(r"(https?:)?//", src), f"{name}: MathJax from the network ({src})"
            assert ((html / name).parent / src.split("?")[0]).resolve().is_file(), f"{name}: {src} is not in the build"
    network = re.compile(r'<(?:script|link)[^>]*(?:src|href)="((?:https?:)?//[^"]*)"')
    remote = {name: network.findall(page) for name, page in pages.items()}
    assert not {k: v for k, v in remote.items() if v}, "pages that load scripts or styles from the network"


#: PNG files the library writes at run time (named on the pages as output files, not figures of the docs).
RUNTIME_OUTPUTS = {"accuracy.png", "gradient_magnitude_probe.png", "residual_probe.png"}


def test_runtime_outputs_are_the_ones_the_code_writes():
    code = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "lightning_mtl").rglob("*.py"))
    assert all(f'"{name}"' in code for name in RUNTIME_OUTPUTS)


@pytest.mark.slow
def test_every_figure_a_page_names_is_shown(html: Path):
    """A page that names a PNG (outside a code block) shows it: an <img> of that file, which the build holds."""
    shown = 0
    for name, page in _pages(html).items():
        images = {src.rsplit("/", 1)[-1]: src for src in re.findall(r'<img[^>]*src="([^"]+\.png)"', page)}
        for src in images.values():
            assert ((html / name).parent / src).resolve().is_file(), f"{name}: {src} is not in the build"
        named = set(re.findall(r"([\w.-]+\.png)\b", _visible_text(page))) - RUNTIME_OUTPUTS
        missing = sorted(n for n in named if n not in images)
        assert not missing, f"{name} names figures it does not show: {missing}"
        shown += len(images)
    committed = {p.name for p in (ROOT / "benchmarks").glob("*.png")}
    embedded = {p.name for p in (html / "_images").glob("*.png")}
    assert committed <= embedded, f"committed figures that no page shows: {sorted(committed - embedded)}"
    assert shown >= len(committed)


#: wording of a lab notebook, not of documentation (a result is described by its method, data, hardware and date)
NOTEBOOK_WORDING = (
    "METHODS.md",
    "METHODS §",
    "for the README",
    "stored copies",
    "could not be read",
    "could not be checked",
    "in this session",
    "as recalled",
    "Placeholder",
    "not committed",
    "lent GPU",
)


@pytest.mark.slow
def test_no_notebook_wording_in_the_pages(html: Path):
    found = {
        name: [w for w in NOTEBOOK_WORDING if w.lower() in _visible_text(page).lower()]
        for name, page in _pages(html).items()
    }
    assert not {k: v for k, v in found.items() if v}


@pytest.mark.slow
def test_numbers_do_not_wrap_and_tables_scroll(html: Path):
    """ "94.43 ± 0.31" sits in one white-space: nowrap span; every table is inside furo's scrolling wrapper."""
    page = (html / "benchmarks" / "multimnist.html").read_text(encoding="utf-8")
    assert '<span class="nowrap">94.43 ± 0.31</span>' in page
    series = (html / "benchmarks" / "series.html").read_text(encoding="utf-8")
    assert '<span class="nowrap">1.4e-03</span>' in series  # browsers break after the hyphen of "1.4e-03"
    css = (html / "_static" / "custom.css").read_text(encoding="utf-8")
    assert re.search(r"\.nowrap\s*\{\s*white-space:\s*nowrap", css)
    for name, page in _pages(html).items():
        outside = re.sub(r'<span class="nowrap">.*?</span>', "", page, flags=re.S)
        assert not re.findall(r"\d ± \d", _visible_text(outside)), f"{name}: a '±' pair that may wrap"
        tables = page.count('<table class="docutils')
        assert page.count('<div class="table-wrapper') >= tables, f"{name}: a table outside the scrolling wrapper"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["index.md", "getting_started.md"])
def test_quickstart_runs_as_written(page: str, tmp_path, monkeypatch, capsys):
    """The landing page's example and "Getting started" run as written, block after block, in one namespace."""
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(DOCS / page)
    assert any("trainer.fit(" in b for b in blocks)
    namespace: dict = {"__name__": "__quickstart__"}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    step = namespace["gradient"].last_step
    assert step is not None and step.tasks == ("left", "right")
    assert bool(step.weights.isfinite().all()) and bool(step.norms.gt(0).all())
    assert "('left', 'right')" in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "the example wrote files into the working directory"


def test_benchmarks_index_lists_every_benchmark_page_with_its_finding():
    index = (DOCS / "benchmarks" / "index.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \{doc\}`(\w+)` \| (.+) \|$", index, flags=re.M))
    pages = {p.stem for p in (ROOT / "benchmarks").glob("*.md") if p.name != "README.md"}
    assert set(rows) == pages
    assert all(len(finding) > 40 for finding in rows.values()), rows
    assert all((DOCS / "benchmarks" / f"{p}.md").is_file() for p in pages)


def test_cli_page_lists_every_shipped_config():
    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(\w+)` \| .+ \|$", cli, flags=re.M))
    shipped = {p.stem for d in ("lightning_mtl", "lightning_gen") for p in (ROOT / d / "configs").glob("*.yaml")}
    assert shipped <= listed, f"configs without a row in docs/cli.md: {sorted(shipped - listed)}"


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t]
    assert targets
    assert not [t for t in targets if t and not (ROOT / t).exists()]
