"""The escape helpers under their old address, for callers written before the dashboard's building blocks were
split into :mod:`robustlens.dashboard.components` (``tests/test_web_surface.py``). New code imports
:mod:`robustlens.dashboard.components.markup`."""

from robustlens.dashboard.components.markup import WORD_JOINER, code, plot_text, text

__all__ = ["WORD_JOINER", "code", "plot_text", "text"]
