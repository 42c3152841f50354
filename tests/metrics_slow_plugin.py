"""A deliberately slow custom metric for the resume test: sleeps ``ROBUSTLENS_TEST_METRIC_DELAY`` seconds
per batch (0 when unset), so that a run can be killed part-way. Its values do not depend on the delay."""

from __future__ import annotations

import os
import time

import torch

from robustlens.analysis.metric_registry import register_metric


@register_metric("slow_peak", description="largest pixel value (computed slowly on purpose)", higher_is="brighter peak")
def slow_peak(images: torch.Tensor) -> torch.Tensor:
    time.sleep(float(os.environ.get("ROBUSTLENS_TEST_METRIC_DELAY", "0")))
    return images.amax(dim=(1, 2, 3))
