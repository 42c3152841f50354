"""robustlens: inspect an image-classification dataset and the model trained on it.

The engine lives in :mod:`robustlens.analysis` (a library, no UI); the Streamlit app in
:mod:`robustlens.dashboard`; the command line in :mod:`robustlens.cli`.
"""

__version__ = "0.1.0"
