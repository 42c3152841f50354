"""Shared fixtures: small real image files written into temporary folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Fixtures shared by several modules, registered here rather than imported into each test module:
# a real PostgreSQL server (postgres_server, postgres_url) and analysed dashboard workspaces
# (analysed_template, analysed_workspace).
pytest_plugins = ["tests.pg", "tests.dashboard_fixtures"]

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


def write_image(
    path: Path, *, mode: str = "RGB", size: tuple[int, int] = (16, 12), seed: int = 0, fmt: str | None = None
) -> Path:
    """Write a random image of ``mode`` (Pillow mode) and ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode in ("RGB", "RGBA"):
        image = Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8), mode)
    elif mode == "L":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=16
        )
    elif mode == "LA":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8), "LA")
    else:
        raise ValueError(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (to prove inputs were not modified)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder tree: 3 classes × 4 RGB PNGs."""
    root = tmp_path / "data"
    for c, name in enumerate(("cat", "dog", "fox")):
        for i in range(4):
            write_image(root / name / f"{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def manifest_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Dataset root with 6 images in a flat folder and a manifest with split + metadata columns."""
    root = tmp_path / "data"
    rows = ["path,label,split,camera,brightness_lux"]
    for i in range(6):
        write_image(root / "imgs" / f"im{i}.png", seed=i)
        rows.append(f"imgs/im{i}.png,{'ab'[i % 2]},{'train' if i < 4 else 'test'},cam{i % 3},{100 + i}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return root, manifest


@pytest.fixture(scope="session")
def sample_workspace(tmp_path_factory) -> Path:
    """A workspace built from the shipped sample data (read-only for tests)."""
    from tests.workspaces import build_sample_workspace

    return build_sample_workspace(tmp_path_factory.mktemp("sample") / "ws")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after: on the 2 shared cores of the test machine more threads
    than free cores stalls torch. Modules of torch-heavy tests use it through an autouse fixture."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's script runner (AppTest) installs the page script as ``sys.modules['__main__']`` and
    leaves it there; a later ``multiprocessing`` spawn would then re-run that script in its children."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
