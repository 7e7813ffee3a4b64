"""Lucerna model manifests: what a model in the Triton model repository is, reads and returns.

A model is a folder ``<repository>/<name>/`` with Triton's ``config.pbtxt``, versioned weights and a
``lucerna.yaml`` manifest. The orchestrator reads manifests for model versions (part of a job's key);
the inference worker for pre- and post-processing, and checks them against what Triton serves.
Parsing is strict: an unknown or missing key is a start-up error naming the file and the key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "lucerna.yaml"

Datatype = Literal["UINT8", "INT16", "FP16", "FP32"]


class ManifestError(ValueError):
    """A manifest that cannot be used, with the file and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Strict):
    file: str  # relative to the model folder, e.g. "1/model.onnx"
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class TensorSpec(_Strict):
    name: str
    datatype: Datatype
    shape: tuple[int, ...]  # per item; the batch dimension is excluded


class Window(_Strict):
    center: float
    width: Annotated[float, Field(gt=0)]


class Preprocessing(_Strict):
    window: Window  # HU after Rescale Slope/Intercept, mapped linearly to 0..255 and clipped
    size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]  # rows, columns
    context_slices: Annotated[int, Field(ge=0, le=8)]  # neighbours each side stacked as channels


class Postprocessing(_Strict):
    score_threshold: Annotated[float, Field(ge=0, le=1)]
    nms_iou: Annotated[float, Field(ge=0, le=1)]
    group_slices: bool  # detection: merge per-slice boxes into lesions across adjacent slices
    max_findings: Annotated[int, Field(ge=1)]
    aggregate: Literal["max", "none"]  # classification: how slice probabilities make the study's


class Coding(_Strict):
    system: str
    code: str
    display: str


class FindingSpec(_Strict):
    code: Coding
    body_site: Coding
    measurements: tuple[Literal["diameter"], ...] = ()


class Manifest(_Strict):
    """One model's manifest (``lucerna.yaml``)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    version: Annotated[str, Field(pattern=r"^[0-9]+$")]
    title: str
    task: Literal["detection", "classification"]
    weights: Weights
    max_batch_size: Annotated[int, Field(ge=1)]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    finding: FindingSpec

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ValueError("a model has exactly one input and one output tensor")
        shape = self.inputs[0].shape
        if len(shape) != 3 or shape[1:] != self.preprocessing.size:
            raise ValueError("the input shape must be [channels, rows, columns] with rows, columns = size")
        if shape[0] != 2 * self.preprocessing.context_slices + 1:
            raise ValueError("input channels must be 2 * context_slices + 1")
        return self


def load_manifest(path: Path) -> Manifest:
    """The manifest in ``path``; ``ManifestError`` naming the file and what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot be read: {exc}") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ManifestError(f"{path}: {problems}") from exc
    if manifest.name != path.parent.name:
        raise ManifestError(f"{path}: name {manifest.name!r} differs from its folder {path.parent.name!r}")
    return manifest


def load_repository(repository: Path) -> dict[str, Manifest]:
    """Every model's manifest in a Triton model repository, by model name."""
    if not repository.is_dir():
        raise ManifestError(f"{repository}: the model repository is not a folder")
    manifests = {}
    for path in sorted(repository.glob(f"*/{MANIFEST_FILE}")):
        manifest = load_manifest(path)
        manifests[manifest.name] = manifest
    return manifests


def weights_path(repository: Path, manifest: Manifest) -> Path:
    """Where a model's weights are, inside the repository."""
    return repository / manifest.name / manifest.weights.file


def check_weights(repository: Path, manifest: Manifest) -> None:
    """Raise ``ManifestError`` unless the weights file exists and has the manifest's SHA-256."""
    path = weights_path(repository, manifest)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the weights: {exc}") from exc
    if digest != manifest.weights.sha256:
        raise ManifestError(f"{path}: SHA-256 {digest} differs from the manifest's {manifest.weights.sha256}")
