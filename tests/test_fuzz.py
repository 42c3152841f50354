"""Property-based fuzzing of the CLI (Hypothesis): manifests, prediction tables, prediction-set names, dashboard
filter URLs and ``--filter`` JSON. Whatever comes in, ``robustlens`` exits 0, or 2 with a message, never with a
traceback or an unexpected-error exit, and never modifies its input files (issue 9, Deliver 7)."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustlens.analysis.names import validate_name
from robustlens.cli import main
from robustlens.query.filters import LIST_KEYS, SCALAR_KEYS
from tests.conftest import tree_digest, write_image

# Each init example costs ~0.4 s (atomic, fsynced writes and a new curation database), so the init properties
# run 12 examples each and the cheaper export property 25: the file stays well under a minute.
_COMMON = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
FUZZ = settings(max_examples=12, **_COMMON)
FUZZ_CHEAP = settings(max_examples=25, **_COMMON)

IMAGES = [f"imgs/im{i}.png" for i in range(4)]
CLASSES = ("a", "b")
_counter = itertools.count()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A dataset of 4 images, a valid manifest and an initialised workspace, shared by every example."""
    base = tmp_path_factory.mktemp("fuzz")
    for i, rel in enumerate(IMAGES):
        write_image(base / "data" / rel, seed=i)
    (base / "labels.csv").write_text("path,label\n" + "".join(f"{p},{CLASSES[i % 2]}\n" for i, p in enumerate(IMAGES)))
    assert (
        main(["init", str(base / "ws"), "--quiet", "--data", str(base / "data"), "--labels", str(base / "labels.csv")])
        == 0
    )
    return base


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.err


def init_cli(capsys, corpus: Path, workspace: Path, *options) -> tuple[int, str]:
    """:func:`run_cli` of ``init WORKSPACE --quiet --data CORPUS/data OPTIONS…``."""
    return run_cli(capsys, ["init", workspace, "--quiet", "--data", corpus / "data", *options])


def assert_clean_outcome(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        assert "error" in err and len(err.strip()) > 10, err


def fresh(corpus: Path, name: str) -> Path:
    """A new, not yet existing path for this example's output."""
    return corpus / "out" / f"{name}{next(_counter)}"


# -- strategies ---------------------------------------------------------------------------------------------------

awkward_text = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "NA",
            "None",
            "null",
            "nan",
            "inf",
            "-1",
            "0",
            "1e309",
            "..",
            "../x",
            "/etc/passwd",
            "imgs/../imgs/im0.png",
            "imgs//im1.png",
            "./imgs/im2.png",
            "C:\\x",
            "=1+1",
            "a;b",
            "a\tb",
            '"quoted"',
            "é",
            "<b>x</b>",
            "![x](http://e/x)",
            "\x00",
            "\n",
        ]
    ),
    st.sampled_from(IMAGES + list(CLASSES)),
    st.text(max_size=12),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr), st.integers(-5, 5).map(str), awkward_text
)


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


@st.composite
def manifests(draw):
    header = draw(
        st.lists(st.sampled_from(["path", "label", "split", "id", "camera", "path", ""]), min_size=1, max_size=5)
    )
    rows = draw(st.lists(st.lists(awkward_text, min_size=len(header), max_size=len(header)), max_size=6))
    # Often a mostly valid table, so the fuzzing reaches past the first check.
    if draw(st.booleans()):
        header = ["path", "label", *header]
        rows = [[IMAGES[i % 4], draw(st.sampled_from(CLASSES + ("NA",))), *row] for i, row in enumerate(rows)]
    return header, rows, draw(st.sampled_from([",", ";", "\t"]))


@st.composite
def prediction_tables(draw):
    key = draw(st.sampled_from(["path", "id", "other"]))
    columns = draw(st.lists(st.sampled_from(["a", "b", "c", "path"]), min_size=1, max_size=4))
    count = draw(st.integers(0, 5))
    rows = [
        [draw(st.sampled_from(IMAGES + ["imgs/none.png"])) if key != "other" else draw(awkward_text)]
        + [draw(numbers) for _ in columns]
        for _ in range(count)
    ]
    return [key, *columns], rows


#: Every filter key of the explorer's URL (from the filter module), members of the r./m. families, their bare
#: prefixes, and a page-state key.
query_keys = st.sampled_from([*LIST_KEYS, *SCALAR_KEYS, "r.width", "r.metric.x", "m.camera", "page", "r.", "m."])
query_values = st.one_of(
    awkward_text,
    st.sampled_from(
        ["0:1", ":", "1:", "a:b", "0,0;1,1;1,0", "0,0;x", "1", "0", "all", "any", "width", "-inf:inf", "nan:nan"]
    ),
)


@st.composite
def query_strings(draw):
    pairs = draw(st.lists(st.tuples(query_keys, query_values), max_size=5))
    text = "&".join(f"{quote(k)}={quote(v, safe='') if draw(st.booleans()) else v}" for k, v in pairs)
    prefix = draw(st.sampled_from(["", "?", "http://localhost:8501/explorer?", "/explorer?"]))
    return prefix + text


# -- properties ---------------------------------------------------------------------------------------------------


@FUZZ
@given(manifest=manifests())
def test_any_manifest_exits_0_or_2_and_is_not_modified(corpus, capsys, manifest):
    header, rows, delimiter = manifest
    path = fresh(corpus, "manifest").with_suffix(".csv")
    path.parent.mkdir(exist_ok=True)
    _write_csv(path, header, rows, delimiter)
    before, data_before = path.read_bytes(), tree_digest(corpus / "data")
    workspace = fresh(corpus, "ws")
    code, err = init_cli(capsys, corpus, workspace, "--labels", path)
    assert_clean_outcome(code, err)
    assert path.read_bytes() == before and tree_digest(corpus / "data") == data_before
    assert workspace.exists() == (code == 0)  # a refused init leaves nothing behind
    shutil.rmtree(workspace, ignore_errors=True)


@FUZZ
@given(table=prediction_tables(), tolerance=st.sampled_from(["0.05", "0", "0.5", "nan", "inf", "-1", "x"]))
def test_any_prediction_table_exits_0_or_2_and_is_not_modified(corpus, capsys, table, tolerance):
    header, rows = table
    path = fresh(corpus, "preds").with_suffix(".csv")
    path.parent.mkdir(exist_ok=True)
    _write_csv(path, header, rows, ",")
    before = path.read_bytes()
    workspace = fresh(corpus, "ws")
    code, err = init_cli(
        capsys,
        corpus,
        workspace,
        "--labels",
        corpus / "labels.csv",
        "--predictions",
        f"p={path}",
        "--sum-tolerance",
        tolerance,
    )
    assert_clean_outcome(code, err)
    assert path.read_bytes() == before
    if code == 0:
        import numpy as np

        from robustlens.analysis.workspace import Workspace

        probabilities = Workspace(workspace).predictions("p")
        assert np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    shutil.rmtree(workspace, ignore_errors=True)


@FUZZ
@given(name=st.one_of(st.text(max_size=20), awkward_text))
def test_any_prediction_set_name_stays_inside_the_workspace(corpus, capsys, name):
    predictions = corpus / "valid_predictions.csv"
    if not predictions.exists():
        predictions.write_text("path,a,b\n" + "".join(f"{p},0.7,0.3\n" for p in IMAGES))
    outside_before = sorted(p.name for p in corpus.iterdir())
    workspace = fresh(corpus, "ws")
    code, err = init_cli(
        capsys, corpus, workspace, "--labels", corpus / "labels.csv", "--predictions", f"{name}={predictions}"
    )
    assert_clean_outcome(code, err)
    assert sorted(p.name for p in corpus.iterdir()) == outside_before  # nothing written next to the workspace
    if code == 0:
        written = [p.name for p in (workspace / "predictions").iterdir()]
        assert written == [f"{name.strip()}.npy"]
        assert validate_name("name", name.strip()) == name.strip()
    shutil.rmtree(workspace, ignore_errors=True)


@FUZZ_CHEAP
@given(query=query_strings())
def test_any_filter_url_exits_0_or_2(corpus, capsys, query):
    export_reads_only(corpus, capsys, "--query", query)


def export_reads_only(corpus, capsys, option, value):
    """``robustlens export WS OPTION VALUE`` exits 0 (writing --out) or 2 (writing nothing), and the export reads
    the workspace: the curation database may be opened, the analysis artifacts never change."""
    workspace = corpus / "ws"
    before = tree_digest(workspace)
    out = fresh(corpus, "export").with_suffix(".csv")
    code, err = run_cli(capsys, ["export", workspace, option, value, "--out", out])
    assert_clean_outcome(code, err)
    assert out.exists() == (code == 0)
    after = tree_digest(workspace)
    assert {k: v for k, v in after.items() if not k.startswith("curation.db")} == {
        k: v for k, v in before.items() if not k.startswith("curation.db")
    }


_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        awkward_text,
        st.sampled_from(["a", "b", "any", "all", "correct", "incorrect", "keep", "width", "id", "p"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(awkward_text, inner, max_size=3)),
    max_leaves=8,
)
filter_fields = st.sampled_from(
    [
        "ranges",
        "labels",
        "splits",
        "prediction_set",
        "predicted",
        "correctness",
        "metadata",
        "issues",
        "issue_mode",
        "tags",
        "collections",
        "review",
        "text",
        "ids",
        "region",
        "slice",
        "sort_by",
        "descending",
        "colour",
    ]
)


@st.composite
def filter_texts(draw):
    """``--filter`` text: arbitrary JSON in arbitrary fields, shapes close to valid, or text that is no JSON."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "any", "broken"]))
    if kind == "broken":
        return draw(st.one_of(awkward_text, st.sampled_from(["{", "[" * 5000, '{"labels": [}', "{'labels': []}"])))
    if kind == "any":
        return json.dumps(draw(_json))
    payload = {}
    for name in draw(st.lists(filter_fields, min_size=1, max_size=3, unique=True)):
        near = {
            "ranges": st.dictionaries(
                st.sampled_from(["width", "height", "", "label"]), st.lists(_json, min_size=2, max_size=2), max_size=2
            ),
            "region": st.lists(st.lists(_json, min_size=2, max_size=2), max_size=4),
            "labels": st.lists(st.sampled_from(CLASSES + ("",)), max_size=2),
        }.get(name, _json)
        payload[name] = draw(st.one_of(_json, near))
    return json.dumps(payload)


@FUZZ_CHEAP
@given(spec=filter_texts())
def test_any_filter_json_exits_0_or_2(corpus, capsys, spec):
    export_reads_only(corpus, capsys, "--filter", spec)


@settings(max_examples=300, **_COMMON)
@given(name=st.text(max_size=40))
def test_validate_name_accepts_only_names_safe_as_files_and_as_text(name):
    """Every accepted name is a plain file name and renders as itself (no path, markup or control characters)."""
    from robustlens.errors import ValidationError

    try:
        accepted = validate_name("tag", name)
    except ValidationError as exc:
        assert "tag" in str(exc)
        return
    assert accepted == name and 0 < len(name) <= 100
    assert not set(name) & set("/\\<>[]()!*`#|&;:'\"=\r\n\t\x00")
    assert ".." not in name and not name.startswith((".", "-", " ")) and not name.endswith(" ")
    assert name.isprintable()
