"""The local Triton server: NVIDIA's ``tritonserver`` from the ``nvidia-pytriton`` wheel serving the model
repository, each model's ONNX weights run by onnxruntime inside PyTriton's Python backend.

Production runs NVIDIA's Triton container over the same repository with its native ONNX Runtime or
TensorRT backends; the worker's client code is the same either way. Here every model folder's
``config.pbtxt`` (Triton's own ``ModelConfig`` text format) gives the tensors, ``max_batch_size`` and
the dynamic batcher's queue delay; the manifest must agree with it and the weights must have the
manifest's SHA-256, or the server refuses to start.

Run it as ``python -m lucerna.inference.local_triton --repository infra/triton/models``. PyTriton's
backend stub links the system's ``libpython3.11.so``; when the interpreter is another 3.11 build
(pyenv), model loading fails inside the stub (``'_thread.RLock' object has no attribute
'_recursion_count'``) unless the interpreter's own library directory comes first on
``LD_LIBRARY_PATH``: the module re-executes itself with it. SIGTERM (or SIGINT) stops the server
cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2  # type: ignore[import-untyped]

from lucerna.core.model_manifest import Manifest, ManifestError, check_weights, load_repository, weights_path

Array = npt.NDArray[Any]

log = logging.getLogger("lucerna.inference.local_triton")

_REEXEC_MARK = "LUCERNA_LOCAL_TRITON_REEXEC"
ACCESS_TOKEN_VARIABLE = "LUCERNA_LOCAL_TRITON_ACCESS_TOKEN"  # noqa: S105 - a variable's name
_NUMPY_OF_TYPE = {
    model_config_pb2.TYPE_UINT8: np.uint8,
    model_config_pb2.TYPE_INT16: np.int16,
    model_config_pb2.TYPE_FP16: np.float16,
    model_config_pb2.TYPE_FP32: np.float32,
}
_MANIFEST_TYPE = {
    "UINT8": model_config_pb2.TYPE_UINT8,
    "INT16": model_config_pb2.TYPE_INT16,
    "FP16": model_config_pb2.TYPE_FP16,
    "FP32": model_config_pb2.TYPE_FP32,
}


class ModelRepositoryError(ValueError):
    """A model folder the local server cannot serve, with the file and the reason."""


@dataclass(frozen=True)
class LocalModel:
    """One model to serve: its manifest, Triton config and weights file."""

    manifest: Manifest
    config: model_config_pb2.ModelConfig
    weights: Path

    @property
    def queue_delay_microseconds(self) -> int:
        """The dynamic batcher's queue delay from config.pbtxt (0 without dynamic batching)."""
        if not self.config.HasField("dynamic_batching"):
            return 0
        return int(self.config.dynamic_batching.max_queue_delay_microseconds)


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """A ``config.pbtxt`` parsed into Triton's ModelConfig message."""
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ModelRepositoryError(f"{path}: cannot be read as a Triton model config: {exc}") from exc


def check_config(manifest: Manifest, config: model_config_pb2.ModelConfig, path: Path) -> None:
    """Raise ``ModelRepositoryError`` unless config.pbtxt describes the manifest's model."""
    problems = []
    if config.name and config.name != manifest.name:
        problems.append(f"name {config.name!r} differs from the manifest's {manifest.name!r}")
    if config.max_batch_size != manifest.max_batch_size:
        problems.append(
            f"max_batch_size {config.max_batch_size} differs from the manifest's {manifest.max_batch_size}"
        )
    for kind, tensors, specs in (
        ("input", config.input, manifest.inputs),
        ("output", config.output, manifest.outputs),
    ):
        served = {(t.name, t.data_type, tuple(t.dims)) for t in tensors}
        wanted = {(s.name, _MANIFEST_TYPE[s.datatype], s.shape) for s in specs}
        if served != wanted:
            problems.append(
                f"{kind}s {sorted((n, model_config_pb2.DataType.Name(d), list(s)) for n, d, s in served)}"
                " differ "
                f"from the manifest's {sorted((s.name, s.datatype, list(s.shape)) for s in specs)}"
            )
    if problems:
        raise ModelRepositoryError(f"{path}: " + "; ".join(problems))


def load_models(repository: Path, names: Sequence[str] = ()) -> list[LocalModel]:
    """The models to serve (all, or ``names``), each checked against its manifest and weights."""
    manifests = load_repository(repository)
    missing = sorted(set(names) - set(manifests))
    if missing:
        raise ModelRepositoryError(
            f"{repository}: no model {missing} (the repository has {sorted(manifests)})"
        )
    models = []
    for name in names or sorted(manifests):
        manifest = manifests[name]
        path = repository / name / "config.pbtxt"
        config = read_config(path)
        check_config(manifest, config, path)
        check_weights(repository, manifest)
        models.append(LocalModel(manifest, config, weights_path(repository, manifest)))
    return models


def onnx_infer_function(model: LocalModel, threads: int) -> Callable[..., dict[str, Array]]:
    """A batched PyTriton infer function running the model's ONNX weights with onnxruntime on CPU."""
    import onnxruntime  # type: ignore[import-untyped]  # noqa: PLC0415 - the local-triton extra only

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        str(model.weights), sess_options=options, providers=["CPUExecutionProvider"]
    )
    onnx_inputs = [i.name for i in session.get_inputs()]
    input_name, output_name = model.manifest.inputs[0].name, model.manifest.outputs[0].name
    if onnx_inputs != [input_name] or [o.name for o in session.get_outputs()] != [output_name]:
        raise ModelRepositoryError(
            f"{model.weights}: ONNX tensors {onnx_inputs} -> {[o.name for o in session.get_outputs()]}"
            " differ "
            f"from the manifest's [{input_name!r}] -> [{output_name!r}]"
        )
    dtype = _NUMPY_OF_TYPE[model.config.output[0].data_type]

    def infer(**inputs: Array) -> dict[str, Array]:
        (output,) = session.run([output_name], {input_name: inputs[input_name]})
        return {output_name: np.asarray(output, dtype=dtype)}

    return infer


def serve(
    models: Sequence[LocalModel],
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    onnx_threads: int = 0,
    host: str = "127.0.0.1",
) -> None:
    """Serve the models until SIGTERM or SIGINT."""
    from pytriton.decorators import batch  # type: ignore[import-untyped]  # noqa: PLC0415 - local-triton extra
    from pytriton.model_config import (  # type: ignore[import-untyped]  # noqa: PLC0415
        DynamicBatcher,
        ModelConfig,
        Tensor,
    )
    from pytriton.triton import (  # type: ignore[import-untyped]  # noqa: PLC0415
        Triton,
        TritonConfig,
        TritonSecurityConfig,
    )

    config = TritonConfig(
        grpc_address=host,
        grpc_port=grpc_port,
        http_address=host,
        http_port=http_port,
        metrics_port=metrics_port,
        allow_gpu_metrics=False,
        exit_on_error=True,
    )

    def stop(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    # Triton's administrative protocols (shared memory, repository, statistics, ...) need this
    # token; PyTriton makes a random one unless the environment gives one (e.g. to a benchmark
    # that registers shared-memory regions). Inference itself needs none.
    security = TritonSecurityConfig(access_token=os.environ.get(ACCESS_TOKEN_VARIABLE) or None)
    with Triton(config=config, security_config=security) as triton:
        for model in models:
            tensors: dict[str, Any] = {
                kind: [
                    Tensor(name=t.name, dtype=_NUMPY_OF_TYPE[t.data_type], shape=tuple(t.dims)) for t in group
                ]
                for kind, group in (("inputs", model.config.input), ("outputs", model.config.output))
            }
            triton.bind(
                model_name=model.manifest.name,
                infer_func=batch(onnx_infer_function(model, onnx_threads)),
                model_version=int(model.manifest.version),
                config=ModelConfig(
                    max_batch_size=model.config.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=model.queue_delay_microseconds),
                ),
                strict=True,
                **tensors,
            )
            log.info("serving %s version %s", model.manifest.name, model.manifest.version)
        try:
            triton.serve()
        except KeyboardInterrupt:
            log.info("stopping")


def library_path_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment with this interpreter's library folder first on LD_LIBRARY_PATH, or None when it
    already is (or the interpreter is statically linked and has none)."""
    environ = dict(os.environ if environ is None else environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if (
        not libdir
        or not Path(libdir, f"libpython{sys.version_info.major}.{sys.version_info.minor}.so").exists()
    ):
        return None
    current = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if current[:1] == [libdir]:
        return None
    environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *current])
    return environ


def command(
    repository: Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    models: Sequence[str] = (),
    onnx_threads: int = 0,
) -> list[str]:
    """The command line that starts the local server."""
    line = [
        sys.executable,
        "-m",
        "lucerna.inference.local_triton",
        "--repository",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        "--onnx-threads",
        str(onnx_threads),
    ]
    if models:
        line += ["--models", ",".join(models)]
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lucerna.inference.local_triton``."""
    parser = argparse.ArgumentParser(
        description="Serve a Lucerna model repository with the local Triton server"
    )
    parser.add_argument("--repository", type=Path, default=Path("infra/triton/models"))
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--models", default="", help="comma-separated; default: every model in the repository"
    )
    parser.add_argument(
        "--onnx-threads", type=int, default=0, help="onnxruntime threads per model (0: default)"
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    environment = library_path_environment()
    if environment is not None and os.environ.get(_REEXEC_MARK) != "1":
        environment[_REEXEC_MARK] = "1"
        args = sys.argv[1:] if argv is None else list(argv)
        # Same interpreter, same arguments; only the library path differs.
        os.execve(  # noqa: S606
            sys.executable, [sys.executable, "-m", "lucerna.inference.local_triton", *args], environment
        )
    try:
        models = load_models(arguments.repository, [m for m in arguments.models.split(",") if m])
    except (ManifestError, ModelRepositoryError) as exc:
        log.error("refusing to start: %s", exc)  # noqa: TRY400 - the reason is the whole story
        return 2
    serve(
        models,
        grpc_port=arguments.grpc_port,
        http_port=arguments.http_port,
        metrics_port=arguments.metrics_port,
        onnx_threads=arguments.onnx_threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
