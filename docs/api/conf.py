"""Sphinx configuration of slim_det's API reference (``make docs``).

Built with ``-W --keep-going``: every warning fails the build, so the docstrings of the modules
listed in index.rst must stay valid reStructuredText (Google style, read by napoleon).
"""
import os
import sys

# The package from this checkout, even when Sphinx runs outside the editable install.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "slim_det"
author = "slim_det contributors"
copyright = "slim_det contributors"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Google-style docstrings (Args:, Returns:, Raises:, Example::), as detectron2 writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Single backticks (`set_width`) in docstrings are cross-references to Python objects; a name that
# does not resolve (a detectron2 class, say) renders as code without a warning.
default_role = "py:obj"

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
# Several classes document their arguments in __init__: show both docstrings.
autoclass_content = "both"
autodoc_typehints = "description"
# Importing slim_det imports torch and detectron2 (both installed by `make setup`); nothing is
# mocked, so the reference documents the objects as they really are.

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "slim_det API reference"
html_static_path = []
