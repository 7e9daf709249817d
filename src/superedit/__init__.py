"""superedit: lifelong knowledge editing of transformer language models.

Nothing heavy is imported here; import the submodules you need, e.g.
``from superedit.models import load_model``.
"""

__version__ = "0.1.0"
