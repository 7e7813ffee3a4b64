"""Evaluate the ONNX models on held-out synthetic scans with the worker's postprocessing.

    python evaluate.py --repo ../../../infra/triton/models \
        --ablation single-scale=runs/detector-single-scale/model.pt \
        --ablation no-attention=runs/detector-no-attention/model.pt --out runs/eval.json

Detector: FROC (lesion-level sensitivity at 1, 2, 4 false positives per scan) on test scans (seeds 500000+):
the worker's postprocessing (threshold, NMS 0.3, grouping across slices, 20 findings) run at each threshold
of a 0.05 grid, the best sensitivity within each FP budget. The operating threshold is picked on separate
validation scans (seeds 400000+) as the lowest grid score with at most 1 false positive per scan; at that
threshold: sensitivity, small-nodule (<= 6 mm) sensitivity, FP/scan.
A predicted lesion hits a nodule when its centre (largest box, its slice) lies within max(radius, slice
thickness) of the nodule's centre in 3D; a nodule counts once, duplicate hits are neither TP nor FP.
Latency: onnxruntime CPU, 2 intra-op threads, batch 16 of 512x512, median over rounds, models interleaved.
Classifier: slice- and scan-level (max over slices) AUC, sensitivity and specificity at 0.5 on head scans.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import data
import lesions
import numpy as np
import onnxruntime as ort

VAL_SEED = 400_000


def session(path: Path) -> ort.InferenceSession:
    """A 2-thread CPU session (the deployment target's per-model share on this machine)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_scan(sess: ort.InferenceSession, scan: data.ChestScan, batch: int = 16) -> np.ndarray:
    """Detections [slices, 100, 5] for every slice of a scan, 2.5D stacked like the worker."""
    n = scan.image.shape[0]
    out = []
    for s in range(0, n, batch):
        x = np.stack([data.stack_25d(scan.image, z) for z in range(s, min(s + batch, n))])
        out.append(sess.run(None, {"image": x})[0])
    return np.concatenate(out)


def match(found: list[lesions.Lesion], scan: data.ChestScan) -> list[int]:
    """For each lesion, the index of the nodule it hits (-1: false positive, -2: duplicate hit)."""
    dz, py, px = scan.spacing
    hit: set[int] = set()
    out = []
    for les in found:
        cz, cy, cx = les.centre()
        best = -1
        for i, n in enumerate(scan.nodules):
            d = np.sqrt(
                ((cz - n.center[0]) * dz) ** 2
                + ((cy - n.center[1]) * py) ** 2
                + ((cx - n.center[2]) * px) ** 2
            )
            if d <= max(n.diameter_mm / 2, dz):
                best = i
                break
        if best >= 0 and best in hit:
            best = -2
        elif best >= 0:
            hit.add(best)
        out.append(best)
    return out


GRID = [round(float(t), 2) for t in np.arange(0.05, 1.0, 0.05)]


def froc(outputs: list[np.ndarray], scans: list[data.ChestScan]) -> dict[str, float]:
    """Sensitivity at 1, 2, 4 FP/scan: the deployed postprocessing run at each threshold of a 0.05 grid,
    keeping the best sensitivity among thresholds within the FP budget (no interpolation)."""
    points = [at_threshold(outputs, scans, t) for t in GRID]
    res: dict[str, float] = {}
    for k in (1, 2, 4):
        res[f"sens@{k}fp"] = max((p["sensitivity"] for p in points if p["fp_per_scan"] <= k), default=0.0)
    res["froc_points"] = [
        (p["threshold"], round(p["sensitivity"], 4), round(p["fp_per_scan"], 3)) for p in points
    ]  # type: ignore[assignment]
    return res


def pick_threshold(outputs: list[np.ndarray], scans: list[data.ChestScan], max_fp: float = 1.0) -> float:
    """The lowest score threshold (0.05 steps) whose lesions give at most ``max_fp`` FP per scan."""
    for t in GRID:
        if at_threshold(outputs, scans, t)["fp_per_scan"] <= max_fp:
            return t
    return GRID[-1]


def at_threshold(outputs: list[np.ndarray], scans: list[data.ChestScan], t: float) -> dict[str, float]:
    """Sensitivity, small-nodule sensitivity and FP/scan with the worker's postprocessing at threshold t."""
    hits = small_hits = small = total = fps = 0
    for o, scan in zip(outputs, scans, strict=True):
        m = match(lesions.lesions(o, t), scan)
        found = {i for i in m if i >= 0}
        fps += sum(1 for i in m if i == -1)
        for i, n in enumerate(scan.nodules):
            total += 1
            hits += i in found
            if n.diameter_mm <= 6.0:
                small += 1
                small_hits += i in found
    return {
        "threshold": t,
        "sensitivity": hits / total,
        "small_sensitivity": small_hits / max(small, 1),
        "fp_per_scan": fps / len(scans),
        "nodules": total,
        "small_nodules": small,
    }


def latency(
    sessions: dict[str, ort.InferenceSession], shape: tuple[int, ...], rounds: int
) -> dict[str, float]:
    """Median ms per item at batch 16, the models measured in turn within each round so that load from
    other processes on a shared machine falls on all of them alike."""
    x = np.random.default_rng(0).integers(0, 256, (16, *shape), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        sess.run(None, {"image": x})
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"image": x})
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) / 16 * 1000 for name, t in times.items()}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels > 0], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate_classifier(path: Path, n_scans: int, seed: int = data.EVAL_SEED) -> dict[str, float]:
    """Slice- and scan-level metrics of the hemorrhage classifier on held-out head scans."""
    sess = session(path)
    slice_p, slice_y, scan_p, scan_y = [], [], [], []
    for i in range(n_scans):
        img, lab = data.head_slices(seed + i, hemorrhage=i % 2 == 0)
        p = np.concatenate(
            [sess.run(None, {"image": img[s : s + 16, None]})[0][:, 0] for s in range(0, len(img), 16)]
        )
        slice_p.append(p)
        slice_y.append(lab)
        scan_p.append(p.max())
        scan_y.append(float(lab.max()))
    sp, sy = np.concatenate(slice_p), np.concatenate(slice_y)
    cp, cy = np.asarray(scan_p), np.asarray(scan_y)
    return {
        "slice_auc": auc(sp, sy),
        "slice_sensitivity@0.5": float(((sp >= 0.5) & (sy > 0)).sum() / max((sy > 0).sum(), 1)),
        "slice_specificity@0.5": float(((sp < 0.5) & (sy == 0)).sum() / max((sy == 0).sum(), 1)),
        "scan_auc": auc(cp, cy),
        "scan_sensitivity@0.5": float(((cp >= 0.5) & (cy > 0)).sum() / max((cy > 0).sum(), 1)),
        "scan_specificity@0.5": float(((cp < 0.5) & (cy == 0)).sum() / max((cy == 0).sum(), 1)),
        "slices": len(sy),
        "positive_slices": int((sy > 0).sum()),
        "scans": n_scans,
        "latency_ms_per_slice_256": latency({"c": sess}, (1, 256, 256), 10)["c"],
    }


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="the Triton model repository (shipped models)")
    ap.add_argument(
        "--ablation", action="append", default=[], help="name=checkpoint.pt, exported and evaluated"
    )
    ap.add_argument("--scans", type=int, default=20, help="held-out test chest scans")
    ap.add_argument("--val-scans", type=int, default=8, help="validation chest scans for the operating point")
    ap.add_argument("--head-scans", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (batch 16 per model per round)")
    ap.add_argument("--detectors-only", action="store_true", help="skip the classifier")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    models = {
        "full (FP32, shipped)": a.repo / "lung-nodule-detector" / "1" / "model.onnx",
        "full (INT8, shipped)": a.repo / "lung-nodule-detector-int8" / "1" / "model.onnx",
    }
    tmp = Path(tempfile.mkdtemp())
    if a.ablation:
        import torch  # noqa: PLC0415 - only needed to export the ablation checkpoints
        from export import export_onnx, load_net  # noqa: PLC0415

        torch.set_num_threads(2)
        for spec in a.ablation:
            name, ckpt = spec.split("=", 1)
            path = tmp / f"{name}.onnx"
            export_onnx(load_net(Path(ckpt), "detector"), (3, 512, 512), "detections", path)
            models[name] = path
    t0 = time.perf_counter()
    val = [data.chest_scan(VAL_SEED + i) for i in range(a.val_scans)]
    test = [data.chest_scan(data.EVAL_SEED + i) for i in range(a.scans)]
    print(
        f"generated {len(val)} validation and {len(test)} test scans in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    results: dict[str, dict[str, object]] = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        sess = session(path)
        t_op = pick_threshold([run_scan(sess, s) for s in val], val)
        outs = [run_scan(sess, s) for s in test]
        results[name] = {
            **froc(outs, test),
            **at_threshold(outs, test, t_op),
            "size_mb": path.stat().st_size / 1e6,
        }
        print(name, json.dumps(results[name]), f"({time.perf_counter() - t0:.0f}s)", flush=True)
    for name, ms in latency({n: session(p) for n, p in models.items()}, (3, 512, 512), a.rounds).items():
        results[name]["latency_ms_per_slice_512"] = ms
    print("latency", {n: round(r["latency_ms_per_slice_512"], 2) for n, r in results.items()}, flush=True)
    if not a.detectors_only:
        results["head-ct-hemorrhage"] = evaluate_classifier(
            a.repo / "head-ct-hemorrhage" / "1" / "model.onnx", a.head_scans
        )
        print("head-ct-hemorrhage", json.dumps(results["head-ct-hemorrhage"]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
