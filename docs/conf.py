"""Sphinx configuration: Markdown pages (MyST) and an API reference from docstrings."""

from __future__ import annotations

import importlib.metadata

project = "safefreeze"
author = "safefreeze developers"
copyright = "2026, safefreeze developers"
release = importlib.metadata.version("safefreeze")

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
html_theme = "alabaster"
