"""Dataset scanning: ImageFolder trees, manifests with metadata, and every structural error."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from robustlens.analysis.ingest.dataset import scan_dataset
from robustlens.errors import ValidationError
from tests.conftest import tree_digest, write_image


def test_imagefolder_lists_every_image_with_path_ids(image_folder):
    scan = scan_dataset(image_folder, progress=False)
    assert scan.kind == "imagefolder"
    assert len(scan.samples) == 12
    assert sorted(scan.samples["label"].unique()) == ["cat", "dog", "fox"]
    assert scan.samples["id"].tolist() == scan.samples["path"].tolist()
    assert scan.samples.loc[0, "id"] == "cat/0.png"
    assert scan.samples["content_hash"].str.len().eq(64).all()
    assert scan.skipped == []


def test_imagefolder_skips_unreadable_images_and_reports_them(image_folder):
    (image_folder / "cat" / "zero.png").write_bytes(b"")
    (image_folder / "dog" / "garbage.jpg").write_bytes(b"\xff\xd8\xff garbage")
    full = (image_folder / "fox" / "0.png").read_bytes()
    (image_folder / "fox" / "cut.png").write_bytes(full[: len(full) // 2])
    (image_folder / "fox" / "notes.txt").write_text("not an image")
    scan = scan_dataset(image_folder, progress=False)
    reasons = {entry["path"]: entry["reason"] for entry in scan.skipped}
    assert set(reasons) == {"cat/zero.png", "dog/garbage.jpg", "fox/cut.png"}
    assert "zero-byte" in reasons["cat/zero.png"]
    assert len(scan.samples) == 12
    assert "fox/notes.txt" in scan.ignored_files
    assert "cat/zero.png" in scan.warnings[0]


def test_imagefolder_rejects_symlinks_leaving_the_root(image_folder, tmp_path):
    outside = write_image(tmp_path / "outside" / "secret.png")
    os.symlink(outside, image_folder / "cat" / "link.png")
    os.symlink(outside.parent, image_folder / "escaped_class")
    inside_link = image_folder / "dog" / "alias.png"
    os.symlink(image_folder / "dog" / "0.png", inside_link)
    scan = scan_dataset(image_folder, progress=False)
    skipped = {entry["path"]: entry["reason"] for entry in scan.skipped}
    assert "outside the dataset root" in skipped["cat/link.png"]
    assert "outside the dataset root" in skipped["escaped_class/"]
    assert "dog/alias.png" in scan.samples["path"].tolist()  # a link that stays inside is fine


def test_empty_imagefolder_is_an_error(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    with pytest.raises(ValidationError, match="empty dataset"):
        scan_dataset(tmp_path / "data", progress=False)


def test_dataset_of_only_broken_images_is_an_error(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(ValidationError, match="none of the 1 listed images could be read"):
        scan_dataset(tmp_path / "data", progress=False)


def test_missing_root(tmp_path):
    with pytest.raises(ValidationError, match="dataset root not found") as info:
        scan_dataset(tmp_path / "nope", progress=False)
    assert info.value.file == str(tmp_path / "nope")


def test_manifest_keeps_split_and_metadata(manifest_dataset):
    root, manifest = manifest_dataset
    scan = scan_dataset(root, manifest, progress=False)
    assert scan.kind == "manifest"
    samples = scan.samples
    assert samples["split"].tolist() == ["train"] * 4 + ["test"] * 2
    assert samples["meta.camera"].tolist() == ["cam0", "cam1", "cam2", "cam0", "cam1", "cam2"]
    assert samples["meta.brightness_lux"].tolist() == [100, 101, 102, 103, 104, 105]
    assert samples["id"].tolist() == [f"imgs/im{i}.png" for i in range(6)]


def test_manifest_parquet_with_explicit_ids(manifest_dataset, tmp_path):
    root, manifest = manifest_dataset
    table = pd.read_csv(manifest)
    table.insert(0, "id", [f"00{i}" for i in range(6)])
    parquet = tmp_path / "labels.parquet"
    table.to_parquet(parquet)
    scan = scan_dataset(root, parquet, progress=False)
    assert scan.samples["id"].tolist() == [f"00{i}" for i in range(6)]


def test_manifest_csv_keeps_leading_zeros_in_ids(manifest_dataset, tmp_path):
    root, manifest = manifest_dataset
    table = pd.read_csv(manifest)
    table.insert(0, "id", [f"00{i}" for i in range(6)])
    path = tmp_path / "with_ids.csv"
    table.to_csv(path, index=False)
    assert scan_dataset(root, path, progress=False).samples["id"].iloc[0] == "000"


def _manifest(tmp_path, lines: list[str]):
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad_path,message",
    [
        ("/etc/passwd", "is absolute"),
        ("../outside.png", "contains '..'"),
        ("imgs/../../outside.png", "contains '..'"),
    ],
)
def test_manifest_rejects_paths_escaping_the_root(manifest_dataset, tmp_path, bad_path, message):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["path,label", "imgs/im0.png,a", f"{bad_path},b"])
    with pytest.raises(ValidationError, match=message) as info:
        scan_dataset(root, manifest, progress=False)
    assert info.value.row == 2 and info.value.column == "path" and info.value.file == str(manifest)


def test_manifest_rejects_symlink_escaping_the_root(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    outside = write_image(tmp_path / "elsewhere" / "x.png")
    os.symlink(outside, root / "imgs" / "sneaky.png")
    manifest = _manifest(tmp_path, ["path,label", "imgs/sneaky.png,a"])
    with pytest.raises(ValidationError, match="outside the dataset root") as info:
        scan_dataset(root, manifest, progress=False)
    assert info.value.row == 1


def test_manifest_missing_files_are_named(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["path,label", "imgs/im0.png,a", "imgs/gone.png,b"])
    with pytest.raises(ValidationError, match="do not exist") as info:
        scan_dataset(root, manifest, progress=False)
    assert info.value.row == 2 and "imgs/gone.png" in str(info.value)


def test_manifest_missing_column(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["path,klass", "imgs/im0.png,a"])
    with pytest.raises(ValidationError, match="required column 'label' is missing") as info:
        scan_dataset(root, manifest, progress=False)
    assert info.value.column == "label"


def test_manifest_empty_label_names_the_row(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["path,label", "imgs/im0.png,a", "imgs/im1.png,"])
    with pytest.raises(ValidationError, match="empty value") as info:
        scan_dataset(root, manifest, progress=False)
    assert (info.value.row, info.value.column) == (2, "label")


def test_manifest_duplicate_ids(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["id,path,label", "x,imgs/im0.png,a", "y,imgs/im1.png,a", "x,imgs/im2.png,b"])
    with pytest.raises(ValidationError, match="duplicate ids: 'x' appears in rows \\[1, 3\\]"):
        scan_dataset(root, manifest, progress=False)


def test_manifest_duplicate_paths_without_ids(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    manifest = _manifest(tmp_path, ["path,label", "imgs/im0.png,a", "imgs/im0.png,b"])
    with pytest.raises(ValidationError, match="duplicate ids"):
        scan_dataset(root, manifest, progress=False)


def test_manifest_with_no_rows_is_empty_dataset(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    with pytest.raises(ValidationError, match="empty dataset"):
        scan_dataset(root, _manifest(tmp_path, ["path,label"]), progress=False)


def test_manifest_unreadable_image_is_skipped_not_fatal(manifest_dataset, tmp_path):
    root, _ = manifest_dataset
    (root / "imgs" / "broken.png").write_bytes(b"")
    manifest = _manifest(tmp_path, ["path,label", "imgs/im0.png,a", "imgs/broken.png,b", "imgs/im1.png,b"])
    scan = scan_dataset(root, manifest, progress=False)
    assert scan.samples["path"].tolist() == ["imgs/im0.png", "imgs/im1.png"]
    assert scan.order == ["imgs/im0.png", "imgs/broken.png", "imgs/im1.png"]
    assert scan.skipped[0]["path"] == "imgs/broken.png"


def test_scanning_never_modifies_the_dataset(manifest_dataset):
    root, manifest = manifest_dataset
    (root / "imgs" / "broken.png").write_bytes(b"")
    before = tree_digest(root.parent)
    scan_dataset(root, manifest, progress=False)
    scan_dataset(root, progress=False)
    assert tree_digest(root.parent) == before


@pytest.mark.parametrize(
    "raw",
    [
        "a/b.png",
        "a//b.png",
        "./a.png",
        "a/./b.png",
        "a/b/",
        "a/.",
        ".",
        "",
        "a/../b.png",
        "x.png",
        "a/.hidden.png",
        "a/b./c.png",
        "..",
        "a/..b/c.png",
    ],
)
def test_manifest_path_normalisation_matches_pathlib(raw):
    """The fast path for already-clean manifest paths normalises exactly as PurePosixPath does."""
    from pathlib import PurePosixPath

    from robustlens.analysis.ingest.dataset import _normalise

    assert _normalise(raw) == PurePosixPath(raw).as_posix()
