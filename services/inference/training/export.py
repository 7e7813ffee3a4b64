"""Export checkpoints to the Triton model repository: ONNX (FP32), INT8 (QDQ static), configs, manifests.

    python export.py --detector runs/detector-full/model.pt --classifier runs/classifier/model.pt \
        --repo ../../../infra/triton/models

Writes ``<repo>/<name>/{config.pbtxt,lucerna.yaml,1/model.onnx}`` for lung-nodule-detector,
lung-nodule-detector-int8 and head-ct-hemorrhage; each manifest carries the sha256 of its ONNX file.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from data import CALIB_SEED, chest_slices_for_calibration
from model import ExportWrapper, HemorrhageClassifier, NoduleDetector
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

OPSET = 17
DETECTOR = "lung-nodule-detector"
DETECTOR_INT8 = "lung-nodule-detector-int8"
CLASSIFIER = "head-ct-hemorrhage"
# Operating points chosen from the FROC / ROC evaluation on the validation seeds (see docs/models.md).
DETECTOR_THRESHOLD = 0.55
CLASSIFIER_THRESHOLD = 0.5

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ {{ name: "image" data_type: TYPE_UINT8 dims: [ {in_dims} ] }} ]
output [ {{ name: "{out_name}" data_type: TYPE_FP32 dims: [ {out_dims} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
version_policy: {{ specific: {{ versions: [ 1 ] }} }}
"""

DETECTOR_MANIFEST = """name: {name}
version: "1"
title: {title}
task: detection
weights:
  file: 1/model.onnx
  sha256: {sha256}
max_batch_size: 16
inputs:
  - {{name: image, datatype: UINT8, shape: [3, 512, 512]}}
outputs:
  - {{name: detections, datatype: FP32, shape: [100, 5]}}
preprocessing:
  window: {{center: -600, width: 1500}}
  size: [512, 512]
  context_slices: 1
postprocessing:
  score_threshold: {threshold}
  nms_iou: 0.3
  group_slices: true
  max_findings: 20
  aggregate: none
finding:
  code: {{system: "http://snomed.info/sct", code: "786838002", display: "Pulmonary nodule"}}
  body_site: {{system: "http://snomed.info/sct", code: "39607008", display: "Lung structure"}}
  measurements: [diameter]
"""

CLASSIFIER_MANIFEST = """name: {name}
version: "1"
title: Head CT intracranial hemorrhage slice classifier
task: classification
weights:
  file: 1/model.onnx
  sha256: {sha256}
max_batch_size: 16
inputs:
  - {{name: image, datatype: UINT8, shape: [1, 256, 256]}}
outputs:
  - {{name: probability, datatype: FP32, shape: [1]}}
preprocessing:
  window: {{center: 40, width: 80}}
  size: [256, 256]
  context_slices: 0
postprocessing:
  score_threshold: {threshold}
  nms_iou: 0.0
  group_slices: false
  max_findings: 1
  aggregate: max
finding:
  code: {{system: "http://snomed.info/sct", code: "274100004", display: "Cerebral hemorrhage"}}
  body_site: {{system: "http://snomed.info/sct", code: "12738006", display: "Brain structure"}}
  measurements: []
"""


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_net(path: Path | None, kind: str, variant: str = "full") -> torch.nn.Module:
    """A trained checkpoint, or a randomly initialised network when ``path`` is None."""
    if path is None:
        torch.manual_seed(0)
        return NoduleDetector(variant) if kind == "detector" else HemorrhageClassifier()
    ckpt = torch.load(path, map_location="cpu")
    net: torch.nn.Module = (
        NoduleDetector(ckpt["variant"]) if ckpt["model"] == "detector" else HemorrhageClassifier()
    )
    net.load_state_dict(ckpt["state_dict"])
    return net


def export_onnx(net: torch.nn.Module, shape: tuple[int, int, int], out_name: str, path: Path) -> None:
    """Trace ``forward_export`` to a single-file ONNX with a dynamic batch dimension."""
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros((2, *shape), dtype=torch.uint8)
    torch.onnx.export(
        ExportWrapper(net),  # type: ignore[arg-type]
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=[out_name],
        dynamic_axes={"image": {0: "batch"}, out_name: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


class SliceReader(CalibrationDataReader):
    """Feeds calibration batches of UINT8 slices to the quantizer."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"image": batch}


def quantize_int8(fp32: Path, int8: Path, batches: list[np.ndarray]) -> None:
    """Static INT8 quantization (QDQ, per-channel weights), calibrated on ``batches``."""
    int8.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep.onnx"
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        quantize_static(
            str(prep),
            str(int8),
            SliceReader(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # The box decoding and TopK stay in float: they are cheap and quantizing them costs precision.
            nodes_to_exclude=_decode_nodes(prep),
        )
    _drop_unused_opsets(int8)


def _drop_unused_opsets(path: Path) -> None:
    """Keep only the operator sets the graph uses: the pre-processing pass declares every domain ORT knows,
    which older Triton ONNX Runtime backends need not accept."""
    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _decode_nodes(path: Path) -> list[str]:
    """Nodes after the last convolution (decode, sigmoid, TopK): kept in float."""
    graph = onnx.load(str(path)).graph
    last_conv = max(i for i, n in enumerate(graph.node) if n.op_type == "Conv")
    return [n.name for n in graph.node[last_conv + 1 :]]


def write_model(repo: Path, name: str, *, manifest: str, config: str, title: str, threshold: float) -> None:
    """config.pbtxt and lucerna.yaml for one model whose ONNX is already in place."""
    folder = repo / name
    digest = sha256(folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config)
    (folder / "lucerna.yaml").write_text(
        manifest.format(name=name, title=title, sha256=digest, threshold=threshold)
    )


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, help="detector checkpoint (omit with --random-init)")
    ap.add_argument("--classifier", type=Path, help="classifier checkpoint (omit with --random-init)")
    ap.add_argument(
        "--random-init", action="store_true", help="export untrained networks (I/O contract only)"
    )
    ap.add_argument("--repo", type=Path, required=True, help="the Triton model repository folder")
    ap.add_argument("--calib-scans", type=int, default=4, help="synthetic chest scans for INT8 calibration")
    ap.add_argument("--calib-seed", type=int, default=CALIB_SEED)
    ap.add_argument("--detector-threshold", type=float, default=DETECTOR_THRESHOLD)
    ap.add_argument("--classifier-threshold", type=float, default=CLASSIFIER_THRESHOLD)
    a = ap.parse_args()
    if not a.random_init and (a.detector is None or a.classifier is None):
        ap.error("--detector and --classifier are required unless --random-init")
    torch.set_num_threads(2)

    det = load_net(None if a.random_init else a.detector, "detector")
    fp32 = a.repo / DETECTOR / "1" / "model.onnx"
    export_onnx(det, (3, 512, 512), "detections", fp32)
    cfg = CONFIG.format(name=DETECTOR, in_dims="3, 512, 512", out_name="detections", out_dims="100, 5")
    title = "CT lung nodule detector (2.5D, FPN + SE/CBAM)"
    write_model(
        a.repo, DETECTOR, manifest=DETECTOR_MANIFEST, config=cfg, title=title, threshold=a.detector_threshold
    )

    quantize_int8(
        fp32,
        a.repo / DETECTOR_INT8 / "1" / "model.onnx",
        chest_slices_for_calibration(a.calib_scans, a.calib_seed),
    )
    cfg = CONFIG.format(name=DETECTOR_INT8, in_dims="3, 512, 512", out_name="detections", out_dims="100, 5")
    title = "CT lung nodule detector, INT8 (2.5D, FPN + SE/CBAM)"
    write_model(
        a.repo,
        DETECTOR_INT8,
        manifest=DETECTOR_MANIFEST,
        config=cfg,
        title=title,
        threshold=a.detector_threshold,
    )

    cls = load_net(None if a.random_init else a.classifier, "classifier")
    export_onnx(cls, (1, 256, 256), "probability", a.repo / CLASSIFIER / "1" / "model.onnx")
    cfg = CONFIG.format(name=CLASSIFIER, in_dims="1, 256, 256", out_name="probability", out_dims="1")
    write_model(
        a.repo,
        CLASSIFIER,
        manifest=CLASSIFIER_MANIFEST,
        config=cfg,
        title="",
        threshold=a.classifier_threshold,
    )
    for name in (DETECTOR, DETECTOR_INT8, CLASSIFIER):
        path = a.repo / name / "1" / "model.onnx"
        print(f"{name}: {path} {path.stat().st_size / 1e6:.2f} MB sha256={sha256(path)}")


if __name__ == "__main__":
    main()
