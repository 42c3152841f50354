"""Time `robustlens analyze` stage by stage and compare with CleanVision on the same image folder.

Usage::

    .venv/bin/python benchmarks/bench_analyze.py --dataset sample        # 2,000 shipped images
    .venv/bin/python benchmarks/bench_analyze.py --dataset fmnist70k     # all 70,000 (needs dataset-fashion-mnist)
    .venv/bin/python benchmarks/bench_analyze.py --dataset fmnist70k --skip-cleanvision

Each side runs in its own fresh subprocess (cold caches, its own peak-RSS reading). "Our
CleanVision-equivalent checks" = the stages that produce CleanVision's issue types: metrics +
quality_flags (dark, light, blurry, low information, odd aspect ratio / size, grayscale) + embeddings +
duplicates (exact and near). CleanVision runs `Imagelab(data_path=...).find_issues()` with its defaults,
which check the same issue types. Two ratios are printed: against those stages alone, and against init
(ingest: listing, decoding and validating every image) plus those stages, since CleanVision starts from
the bare folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = ("metrics", "quality_flags", "embeddings", "duplicates")

OURS = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from robustlens.analysis.analyze import analyze
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
    data, labels, predictions, model, config, ws, stages = sys.argv[1:8]
    start = time.perf_counter()
    workspace, _ = init_workspace(Path(ws), InitOptions(data=Path(data), labels=Path(labels),
        predictions=[("cnn", Path(predictions))], model=model, model_config=Path(config), progress=False))
    init_seconds = time.perf_counter() - start
    report = analyze(workspace, stages=None if stages == "all" else stages.split(","), progress=False)
    print(json.dumps({"init": init_seconds, "stages": report.seconds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

CLEANVISION = textwrap.dedent("""
    import json, resource, sys, time
    from cleanvision import Imagelab
    start = time.perf_counter()
    lab = Imagelab(data_path=sys.argv[1])
    lab.find_issues()
    seconds = time.perf_counter() - start
    counts = {k: int(v) for k, v in lab.issue_summary.set_index("issue_type")["num_images"].items()}
    print(json.dumps({"seconds": seconds, "counts": counts,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def _run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("sample", "fmnist70k"), default="sample")
    parser.add_argument("--skip-cleanvision", action="store_true")
    args = parser.parse_args()
    if args.dataset == "sample":
        data = REPO / "sample_data"
    else:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from fashion_mnist import prepare

        data = prepare()
    image_folder = data / "images"
    common = [
        str(data),
        str(data / "labels.csv"),
        str(data / "predictions.csv"),
        str(REPO / "sample_data" / "model.pt"),
        str(REPO / "sample_data" / "model.json"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        equivalent = _run(OURS, *common, str(Path(tmp) / "eq"), ",".join(EQUIVALENT))
        full = _run(OURS, *common, str(Path(tmp) / "full"), "all")
    ours_eq = sum(equivalent["stages"].values())
    print(f"dataset: {args.dataset} ({image_folder})")
    print(f"init (ingest + validation): {full['init']:.1f} s")
    print("full analysis, stage by stage:")
    for stage, seconds in full["stages"].items():
        print(f"  {stage:<14} {seconds:7.2f} s")
    print(
        f"  {'total':<14} {sum(full['stages'].values()):7.2f} s   (+ init {full['init']:.1f} s); "
        f"peak RSS {full['peak_rss_mib']:.0f} MiB"
    )
    print(
        f"CleanVision-equivalent stages {', '.join(EQUIVALENT)}: {ours_eq:.2f} s; "
        f"peak RSS {equivalent['peak_rss_mib']:.0f} MiB"
    )
    print("  stage by stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in equivalent["stages"].items()))
    print(f"CleanVision-equivalent from the image folder (init + those stages): {equivalent['init'] + ours_eq:.2f} s")
    if not args.skip_cleanvision:
        cleanvision = _run(CLEANVISION, str(image_folder))
        print(
            f"CleanVision find_issues: {cleanvision['seconds']:.2f} s; "
            f"peak RSS {cleanvision['peak_rss_mib']:.0f} MiB; issues {cleanvision['counts']}"
        )
        print(f"ratio CleanVision / robustlens-equivalent stages: {cleanvision['seconds'] / ours_eq:.1f}x")
        print(
            f"ratio CleanVision / robustlens init + equivalent stages: "
            f"{cleanvision['seconds'] / (equivalent['init'] + ours_eq):.1f}x"
        )


if __name__ == "__main__":
    main()
