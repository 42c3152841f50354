"""Default sizes of a robustness run, in a module that imports nothing heavy.

:class:`~robustlens.analysis.robustness.run.RobustnessConfig` takes its defaults from here, and so do the
``robustlens robustness`` options and their help, so that building the CLI parser (``robustlens --help``) does
not import torch through the robustness package.
"""

MAX_SAMPLES = 500
ATTACK_SAMPLES = 200
VERIFY_SAMPLES = 100
SMOOTHING_SAMPLES = 100
SMOOTHING_SIGMA = 0.25
SMOOTHING_N0 = 100
SMOOTHING_N = 1000
