"""Client SDK for convserve: image classification and 2-D convolution over gRPC.

Needs only grpcio (with grpcio-health-checking), protobuf, numpy and the
pure-Python prometheus-client (read by ``convserve bench --metrics-url``);
image files need pillow (the ``images`` extra) and the load generator's
``--protocol oip`` needs tritonclient (the ``oip`` extra).

    from convserve.client import ConvServeClient

    with ConvServeClient("localhost:8500") as client:
        result = client.predict(images)  # uint8 [N,H,W,C] or float32 in [0, 1]
        print(result.class_indices, result.labels, result.confidences)
        fashion = client.predict(clothes, model="fashion")
        print([(m.name, m.ready) for m in client.list_models()])
"""

from convserve.client.async_client import AsyncConvServeClient
from convserve.client.channel import TlsConfig
from convserve.client.errors import (
    CancelledError,
    ConvServeError,
    DeadlineExceededError,
    InputError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from convserve.client.images import mnist_preprocess, prepare_image
from convserve.client.results import (
    FeatureMapsResult,
    FitKernelResult,
    LayerInfo,
    ModelList,
    ModelMetadata,
    ModelStatus,
    Prediction,
    PredictResult,
    TensorSpec,
    TrainingRecord,
    VersionStatus,
)
from convserve.client.retry import RetryPolicy
from convserve.client.stream import PredictStream
from convserve.client.sync_client import ConvServeClient

__all__ = [
    "AsyncConvServeClient",
    "CancelledError",
    "ConvServeClient",
    "ConvServeError",
    "DeadlineExceededError",
    "FeatureMapsResult",
    "FitKernelResult",
    "InputError",
    "InternalError",
    "InvalidArgumentError",
    "LayerInfo",
    "ModelList",
    "ModelMetadata",
    "ModelStatus",
    "NotFoundError",
    "PermissionDeniedError",
    "PredictResult",
    "PredictStream",
    "Prediction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "TensorSpec",
    "TlsConfig",
    "TrainingRecord",
    "UnauthenticatedError",
    "UnavailableError",
    "VersionStatus",
    "mnist_preprocess",
    "prepare_image",
]
