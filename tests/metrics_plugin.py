"""Custom metrics defined outside the engine, the way a user adds one (imported via ``Config(plugins=...)``).

``centre_brightness`` is a pixel metric; ``pixels_per_byte`` a record metric; ``counted`` records how many
images it was called on (``CALLS``), to prove which images a run actually measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from robustlens.analysis.metric_registry import register_metric

CALLS = {"images": 0, "batches": 0}


@register_metric(
    "centre_brightness",
    description="mean of all channels over the central half of the image",
    higher_is="brighter centre",
)
def centre_brightness(images: torch.Tensor) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = height // 4, width // 4
    centre = images[:, :, top : top + max(1, height // 2), left : left + max(1, width // 2)]
    return centre.mean(dim=(1, 2, 3))


@register_metric(
    "pixels_per_byte", description="width × height / file size", higher_is="better compressed", source="record"
)
def pixels_per_byte(samples: pd.DataFrame) -> np.ndarray:
    return (samples["width"] * samples["height"] / samples["file_size"]).to_numpy(dtype=np.float64)


@register_metric("counted", description="0 for every image; counts the images it is computed on", higher_is="nothing")
def counted(images: torch.Tensor) -> torch.Tensor:
    CALLS["images"] += int(images.shape[0])
    CALLS["batches"] += 1
    return images.new_zeros(images.shape[0])
