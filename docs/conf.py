"""Sphinx configuration for the lightning-mtl documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages document the public names only (``lightning_mtl``, ``lightning_mtl.callbacks``,
``lightning_mtl.engine``, ``lightning_gen.cosent``, ``lightning_gen.ddpm``, ``lightning_gen.gau``), each by its
public path, so code can move between the internal submodules without touching the docs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parents[1]
# Document the working tree, also where the package is installed elsewhere (or not installed).
sys.path.insert(0, str(ROOT))

import lightning_mtl  # noqa: E402

project = "lightning-mtl"
author = "lightning-mtl developers"
copyright = "lightning-mtl developers"
release = lightning_mtl.__version__
version = release

#: the repository link in the page footer and on each page ("view source"): pyproject.toml's [project.urls]
REPOSITORY = re.search(r'^Repository = "(.+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)[1]

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped with the pages (copied to _static/mathjax): formulas render without a network.
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
    "myst_parser",
]
# No sphinx.ext.intersphinx: the build must not need the network.

# "--config" stays two hyphens (docutils would print an en dash), quotes stay straight.
smartquotes = False

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- autodoc -------------------------------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
# Members that only override a torch / Lightning hook (forward, setup, on_train_batch_end, ...) have no docstring of
# their own; without this they would show torch's and Lightning's docstrings, written for their own Sphinx set-up.
autodoc_inherit_docstrings = False
autoclass_content = "class"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"

# -- napoleon (Google-style "Args:", "Returns:", "Raises:", "Attributes:" sections) -------------------------------
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- MyST (markdown pages and the benchmark tables under benchmarks/) ----------------------------------------------
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"lightning-mtl {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "source_repository": REPOSITORY,
    "source_branch": "main",
    "source_directory": "docs/",
    "top_of_page_buttons": ["view"],
    "footer_icons": [
        {
            "name": "GitHub",
            "url": REPOSITORY,
            "html": '<svg stroke="currentColor" fill="currentColor" stroke-width="0" viewBox="0 0 16 16"><path '
            'fill-rule="evenodd" d="M8 0C3.58 0 0 3.58 0 8c0 3.54 2.29 6.53 5.47 7.59.4.07.55-.17.55-.38 '
            "0-.19-.01-.82-.01-1.49-2.01.37-2.53-.49-2.69-.94-.09-.23-.48-.94-.82-1.13-.28-.15-.68-.52-.01-.53.63-.01 "
            "1.08.58 1.23.82.72 1.21 1.87.87 2.33.66.07-.52.28-.87.51-1.07-1.78-.2-3.64-.89-3.64-3.95 "
            "0-.87.31-1.59.82-2.15-.08-.2-.36-1.02.08-2.12 0 0 .67-.21 2.2.82.64-.18 1.32-.27 2-.27.68 0 1.36.09 "
            "2 .27 1.53-1.04 2.2-.82 2.2-.82.44 1.1.16 1.92.08 2.12.51.56.82 1.27.82 2.15 0 3.07-1.87 3.75-3.65 "
            "3.95.29.25.54.69.54 1.36 0 .98-.01 1.77-.01 2.01 0 .21.15.46.55.38A8.013 8.013 0 0 0 16 8"
            "c0-4.42-3.58-8-8-8z"
            '"></path></svg>',
            "class": "",
        },
    ],
}
# The copy button leaves out the prompts of console and doctest blocks.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


# -- Numbers that must not wrap ------------------------------------------------------------------------------------
# "94.43 ± 0.31", "1.12-1.21×", "1.4e-03", "−0.23 → −0.50" in a narrow table column would otherwise break over several
# lines (browsers break after a hyphen): each such run of text becomes an inline node with the class "nowrap"
# (white-space: nowrap in _static/custom.css). Plain numbers ("94.43") cannot break and are left alone.
_NUMBER = r"[−-]?\d[\d,.]*(?:[eE][−+-]?\d+)?(?:\s?[%×])?"
_NOWRAP = re.compile(rf"{_NUMBER}(?:\s?(?:±|-|–|→)\s?{_NUMBER})*")
_BREAKABLE = re.compile(r"[\s±→–-]|[eE][−+-]")


def _keep_numbers_together(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    for text in list(doctree.findall(nodes.Text)):
        parent = text.parent
        if parent is None or isinstance(parent, (nodes.literal, nodes.literal_block, nodes.raw, nodes.math)):
            continue
        value = str(text)
        pieces, last = [], 0
        for match in _NOWRAP.finditer(value):
            if not _BREAKABLE.search(match.group().strip()):
                continue
            pieces += [
                nodes.Text(value[last : match.start()]),
                nodes.inline(match.group(), match.group(), classes=["nowrap"]),
            ]
            last = match.end()
        if pieces:
            pieces.append(nodes.Text(value[last:]))
            parent.replace(text, [p for p in pieces if not (isinstance(p, nodes.Text) and not str(p))])


def setup(app: Sphinx) -> None:
    app.connect("doctree-resolved", _keep_numbers_together)
