"""The local Triton server's checks of the model repository (no server started)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lucerna.core.model_manifest import ManifestError
from lucerna.inference.local_triton import (
    ModelRepositoryError,
    command,
    library_path_environment,
    load_models,
)

REPOSITORY = Path(__file__).resolve().parents[3] / "infra" / "triton" / "models"


def test_the_shipped_repository_loads_with_its_batcher_settings() -> None:
    models = {model.manifest.name: model for model in load_models(REPOSITORY)}
    assert {"lung-nodule-detector", "lung-nodule-detector-int8", "head-ct-hemorrhage"} <= set(models)
    detector = models["lung-nodule-detector"]
    assert detector.config.max_batch_size == detector.manifest.max_batch_size
    assert detector.queue_delay_microseconds > 0
    assert [model.manifest.name for model in load_models(REPOSITORY, ["head-ct-hemorrhage"])] == [
        "head-ct-hemorrhage"
    ]


def copy_of(model: str, tmp_path: Path) -> Path:
    shutil.copytree(REPOSITORY / model, tmp_path / model)
    return tmp_path / model


def test_a_config_unlike_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = copy_of("head-ct-hemorrhage", tmp_path)
    config = folder / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 1, 256, 256 ]", "dims: [ 1, 128, 128 ]"))
    with pytest.raises(
        ModelRepositoryError, match=r"config\.pbtxt: inputs .*128, 128.* differ from the manifest"
    ):
        load_models(tmp_path)


def test_a_config_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    folder = copy_of("head-ct-hemorrhage", tmp_path)
    (folder / "config.pbtxt").write_text("max_batch_size: sixteen\n")
    with pytest.raises(ModelRepositoryError, match="cannot be read as a Triton model config"):
        load_models(tmp_path)


def test_weights_unlike_the_manifest_are_refused(tmp_path: Path) -> None:
    folder = copy_of("head-ct-hemorrhage", tmp_path)
    with (folder / "1" / "model.onnx").open("ab") as weights:
        weights.write(b"tampered")
    with pytest.raises(ManifestError, match="differs from the manifest's"):
        load_models(tmp_path)


def test_an_unknown_model_is_refused() -> None:
    with pytest.raises(ModelRepositoryError, match=r"no model \['nope'\]"):
        load_models(REPOSITORY, ["nope"])


def test_the_interpreter_library_folder_goes_first_on_the_library_path() -> None:
    environment = library_path_environment({"LD_LIBRARY_PATH": "/opt/other"})
    if environment is None:
        pytest.skip("this interpreter is statically linked: there is no libpython to put first")
    first, *rest = environment["LD_LIBRARY_PATH"].split(":")
    assert rest == ["/opt/other"]
    assert Path(first, "libpython3.11.so").exists() or list(Path(first).glob("libpython3.*.so"))
    assert library_path_environment(environment) is None  # already first: no re-exec


def test_the_command_line_names_the_ports_and_models() -> None:
    line = command(REPOSITORY, grpc_port=1, http_port=2, metrics_port=3, models=["a", "b"])
    assert line[1:3] == ["-m", "lucerna.inference.local_triton"]
    assert line[line.index("--grpc-port") + 1] == "1"
    assert line[-2:] == ["--models", "a,b"]
