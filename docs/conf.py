"""Sphinx configuration for the lightning-mtl documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages document the public names only (``lightning_mtl``, ``lightning_mtl.callbacks``,
``lightning_mtl.engine``, ``lightning_gen.cosent``, ``lightning_gen.ddpm``, ``lightning_gen.gau``), each by its
public path, so code can move between the internal submodules without touching the docs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Document the working tree, also where the package is installed elsewhere (or not installed).
sys.path.insert(0, str(ROOT))

import lightning_mtl  # noqa: E402

project = "lightning-mtl"
author = "lightning-mtl developers"
copyright = "lightning-mtl developers"
release = lightning_mtl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
# No sphinx.ext.intersphinx: the build must not need the network.

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
html_theme = "alabaster"
html_title = f"lightning-mtl {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Multi-task gradient callbacks, training probes and reference models for PyTorch Lightning",
    "fixed_sidebar": True,
}
