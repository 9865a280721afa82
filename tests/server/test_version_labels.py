"""Version labels of the model config file: which version each points at, how requests
resolve them, how they move without a reload, and how they travel over gRPC.

The first part drives a `ModelManager` with a loader that needs no TensorFlow; the
second a runtime serving real exports (two versions of the shared MNIST model) from
a model config file, as the file poller does; the last a real server spoken to by
the stock TF Serving stubs and convserve's own client.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from convserve.client import AsyncConvServeClient, ConvServeClient, InputError, NotFoundError
from convserve.server import errors, model_versions, types
from convserve.server.model_config import VersionPolicy, read_model_config_file
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor
from tests import polling
from tests.interop.loop_thread import serving
from tests.server.runtime_helpers import copy_base, make_settings, started_runtime
from tests.server.test_metrics import value
from tests.server.test_models import FakeLoader, add_version

Labels = tuple[tuple[str, int], ...]


def manager_for(
    base: Path,
    versions: tuple[int, ...],
    labels: Labels = (),
    *,
    allow: bool = False,
) -> tuple[model_versions.ModelManager, FakeLoader]:
    """A manager of model "mnist" loading exactly `versions` (those on disk)."""
    loader = FakeLoader()
    manager = model_versions.ModelManager(
        base,
        "mnist",
        "/CPU:0",
        loader=loader,
        policy=VersionPolicy("specific", versions=versions),
        settle_s=0.0,
        labels=labels,
        allow_unavailable_labels=allow,
    )
    return manager, loader


def version_of(manager: model_versions.ModelManager, **ref: Any) -> int:
    return manager.resolve(types.ModelRef(**ref)).version


def label_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == model_versions.__name__
        and r.levelno == level
        and "version label" in r.getMessage()
    ]


# -- the manager ---------------------------------------------------------------------


async def test_labels_resolve_to_their_versions_once_loaded(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _ = manager_for(tmp_path, (1, 2), (("stable", 1), ("canary", 2)))
    # Nothing is loaded before the first poll: the labels are configured, not in effect.
    assert (manager.labels, manager.label_errors) == ((), ())
    with pytest.raises(errors.Unavailable, match="version label 'canary' -> 2 is not in effect"):
        manager.resolve(types.ModelRef(label="canary"))
    await manager.poll_once()
    assert manager.labels == (("canary", 2), ("stable", 1))
    assert manager.label_errors == ()
    assert version_of(manager, label="canary") == 2
    assert version_of(manager, label="stable") == 1
    assert version_of(manager, name="mnist", label="stable") == 1
    # "latest" is implicit: the serving version.
    assert version_of(manager, label="latest") == 2
    assert version_of(manager) == 2
    # A label is leased as a pinned version is: the same loaded object.
    with manager.lease(types.ModelRef(label="stable")) as held:
        assert held is manager.resolve(types.ModelRef(version=1))
        assert held.leases == 1
    assert held.leases == 0


async def test_a_label_the_model_lacks_is_not_found_naming_its_labels(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1,), (("stable", 1), ("canary", 1)))
    await manager.poll_once()
    with pytest.raises(errors.NotFound) as exc:
        manager.resolve(types.ModelRef(label="beta"))
    assert str(exc.value) == (
        "model 'mnist' has no version label 'beta' (its labels: 'canary', 'stable'; "
        "'latest' names the serving version)"
    )
    with pytest.raises(errors.NotFound, match=r"'m+…' \(9000 characters\) \(its labels"):
        manager.resolve(types.ModelRef(label="m" * 9000))
    with pytest.raises(errors.NotFound, match=r"model_spec\.name: model 'fashion' is not served"):
        manager.resolve(types.ModelRef(name="fashion", label="stable"))


async def test_stable_means_the_serving_version_unless_configured(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _ = manager_for(tmp_path, (1, 2))
    await manager.poll_once()
    assert version_of(manager, label="stable") == 2
    assert version_of(manager, label="latest") == 2
    with pytest.raises(errors.NotFound, match=r"no version label 'canary' \(its labels: none;"):
        manager.resolve(types.ModelRef(label="canary"))
    # Configured, both name what the configuration says.
    manager.set_labels((("stable", 1), ("latest", 1)))
    assert version_of(manager, label="stable") == 1
    assert version_of(manager, label="latest") == 1
    # And implicit again once they are removed.
    manager.set_labels(())
    assert version_of(manager, label="stable") == 2


async def test_a_version_and_a_label_together_are_invalid(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1,), (("stable", 1),))
    await manager.poll_once()
    with pytest.raises(errors.InvalidArgument) as exc:
        manager.resolve(types.ModelRef(version=1, label="stable"))
    assert str(exc.value) == (
        "model_spec: a version or a version label expected, not both "
        "(got version 1 and version label 'stable')"
    )


async def test_moving_a_label_swaps_it_at_once_and_reloads_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, loader = manager_for(tmp_path, (1, 2), (("canary", 1),))
    await manager.poll_once()
    loaded = manager.loaded
    with manager.lease(types.ModelRef(label="canary")) as before_move:
        with caplog.at_level(logging.INFO, logger=model_versions.__name__):
            manager.set_labels((("canary", 2),))
        # The move took effect within the call: no poll, no load.
        assert version_of(manager, label="canary") == 2
        # A request that resolved the label before the move keeps its version.
        assert before_move.version == 1
        assert not before_move.retired
    assert manager.loaded == loaded
    assert all(a is b for a, b in zip(manager.loaded, loaded, strict=True))
    assert loader.calls == [2, 1]
    assert label_logs(caplog, logging.INFO) == ["model mnist: version label 'canary' -> 2 (was 1)"]
    await manager.poll_once()
    assert loader.calls == [2, 1]
    assert manager.labels == (("canary", 2),)


async def test_a_label_to_a_version_not_loaded_is_refused_until_it_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _ = manager_for(tmp_path, (1, 2, 4), (("canary", 2), ("stable", 1)))
    await manager.poll_once()
    refused = (
        "model mnist: version label 'canary' -> 4 not applied: version 4 is not loaded "
        "(loaded: 1, 2); 'canary' stays on version 2"
    )
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        manager.set_labels((("canary", 4), ("stable", 1)))
        # Every poll checks again; the refusal is logged once.
        await manager.poll_once()
        await manager.poll_once()
    errors_logged = label_logs(caplog, logging.ERROR)
    assert len(errors_logged) == 1
    assert errors_logged[0].startswith(refused + " (a label may point only at a loaded version")
    assert manager.label_errors == (refused,)
    assert manager.labels == (("canary", 2), ("stable", 1))
    assert version_of(manager, label="canary") == 2

    caplog.clear()
    add_version(tmp_path, 4)
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        await manager.poll_once()
    assert manager.labels == (("canary", 4), ("stable", 1))
    assert manager.label_errors == ()
    assert version_of(manager, label="canary") == 4
    assert label_logs(caplog, logging.INFO) == [
        "model mnist: version label 'canary' -> 4 now in effect (was 2): version 4 has loaded"
    ]
    assert label_logs(caplog, logging.ERROR) == []


async def test_a_refused_label_moved_elsewhere_is_no_longer_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _ = manager_for(tmp_path, (1, 2, 4), (("canary", 2),))
    await manager.poll_once()
    manager.set_labels((("canary", 4),))
    assert len(manager.label_errors) == 1
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        manager.set_labels((("canary", 1),))
    assert (manager.labels, manager.label_errors) == ((("canary", 1),), ())
    assert label_logs(caplog, logging.INFO) == ["model mnist: version label 'canary' -> 1 (was 2)"]
    # Refused again later for version 4: logged again, as it is news again.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=model_versions.__name__):
        manager.set_labels((("canary", 4),))
    assert len(label_logs(caplog, logging.ERROR)) == 1


async def test_a_new_label_to_a_version_not_loaded_is_not_in_effect(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1, 9), (("next", 9),))
    await manager.poll_once()
    assert manager.labels == ()
    assert manager.label_errors == (
        "model mnist: version label 'next' -> 9 not applied: version 9 is not loaded "
        "(loaded: 1); 'next' is not in effect",
    )
    # Configured, so neither unknown (NOT_FOUND) nor the serving version: UNAVAILABLE.
    with pytest.raises(errors.Unavailable) as exc:
        manager.resolve(types.ModelRef(label="next"))
    assert str(exc.value) == (
        "model 'mnist' version label 'next' -> 9 is not in effect: version 9 is not loaded "
        "(loaded versions: [1])"
    )


async def test_a_configured_stable_label_not_in_effect_is_not_the_serving_version(
    tmp_path: Path,
) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1, 3), (("stable", 3),))
    await manager.poll_once()
    with pytest.raises(errors.Unavailable, match="version label 'stable' -> 3 is not in effect"):
        manager.resolve(types.ModelRef(label="stable"))


async def test_a_label_whose_version_is_unloaded_leaves_effect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _ = manager_for(tmp_path, (1, 2), (("stable", 1),))
    await manager.poll_once()
    shutil.rmtree(tmp_path / "1")
    with caplog.at_level(logging.ERROR, logger=model_versions.__name__):
        await manager.poll_once()
    assert manager.loaded_versions == (2,)
    assert manager.labels == ()
    assert manager.label_errors == (
        "model mnist: version label 'stable' -> 1 not applied: version 1 is not loaded "
        "(loaded: 2); 'stable' is not in effect",
    )
    assert len(label_logs(caplog, logging.ERROR)) == 1
    with pytest.raises(errors.Unavailable, match="'stable' -> 1 is not in effect"):
        manager.resolve(types.ModelRef(label="stable"))


async def test_with_the_allow_flag_a_label_takes_a_version_not_loaded_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1, 2), (("canary", 1),), allow=True)
    await manager.poll_once()
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        manager.set_labels((("canary", 2),))
        await manager.poll_once()
    assert manager.labels == (("canary", 2),)
    assert manager.label_errors == ()
    assert label_logs(caplog, logging.WARNING) == [
        "model mnist: version label 'canary' -> 2 (was 1), a version that is not loaded: "
        "requests by the label get UNAVAILABLE until it is"
    ]
    with pytest.raises(errors.Unavailable) as exc:
        manager.resolve(types.ModelRef(label="canary"))
    assert str(exc.value) == (
        "model 'mnist' version label 'canary' -> 2: version 2 is not loaded yet "
        "(loaded versions: [1])"
    )
    add_version(tmp_path, 2)
    await manager.poll_once()
    assert version_of(manager, label="canary") == 2


async def test_a_removed_label_is_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    add_version(tmp_path, 1)
    manager, _ = manager_for(tmp_path, (1, 5), (("canary", 1), ("next", 5)))
    await manager.poll_once()
    assert len(manager.label_errors) == 1
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        manager.set_labels((("beta", 1),))
    assert manager.labels == (("beta", 1),)
    assert manager.label_errors == ()
    assert "model mnist: version label 'canary' removed" in label_logs(caplog, logging.INFO)
    with pytest.raises(errors.NotFound, match=r"no version label 'canary' \(its labels: 'beta';"):
        manager.resolve(types.ModelRef(label="canary"))


# -- the runtime, with real exports ------------------------------------------------------


def write_config(path: Path, labels: Labels, versions: tuple[int, ...] = (1, 2)) -> None:
    """A config file serving model "mnist" from ./mnist: `versions` and `labels`."""
    policy = " ".join(f"versions: {v}" for v in versions)
    entries = " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels)
    path.write_text(
        'model_config_list { config { name: "mnist" base_path: "mnist"'
        f" model_version_policy {{ specific {{ {policy} }} }} {entries} }} }}",
        encoding="utf-8",
    )


def two_versions(model_base_path: Path, tmp_path: Path) -> Path:
    """A config directory whose model "mnist" has versions 1 and 2 (the same export)."""
    base = copy_base(model_base_path, tmp_path / "mnist")
    copy_base(model_base_path, base, {1: 2})
    return tmp_path / "models.conf"


@pytest.mark.slow
async def test_a_config_edit_of_labels_alone_moves_them_under_load_without_a_reload(
    model_base_path: Path, sample_digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    config = two_versions(model_base_path, tmp_path)
    write_config(config, (("canary", 1), ("stable", 1)), versions=(1, 2, 3))
    settings = make_settings(
        tmp_path, model_config_file=config, engine_workers="thread", version_settle_s=0
    )
    runtime, metrics = await started_runtime(settings)
    served = runtime.served("mnist")
    loaded = served.manager.loaded
    request = types.PredictInput(sample_digits[0][:4], types.ModelRef("mnist", label="canary"))
    answered: list[tuple[float, int]] = []  # (when the request started, its version)
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            begun = time.monotonic()
            try:
                out = await runtime.predict(request, deadline=begun + 60)
            except Exception as exc:  # every failure is reported below
                failures.append(exc)
                return
            answered.append((begun, out.model_version))

    async def until(what: str, check: Callable[[], bool]) -> None:
        def no_failure_and_check() -> bool:
            assert not failures, failures  # a failed call ends the wait at once
            return check()

        await polling.until(no_failure_and_check, what=what, timeout_s=120)

    def count(version: int) -> int:
        return sum(1 for _, v in answered if v == version)

    clients = [asyncio.create_task(client()) for _ in range(6)]
    try:
        await until("traffic on version 1", lambda: count(1) >= 12)
        write_config(config, (("canary", 2), ("stable", 1)), versions=(1, 2, 3))
        assert await runtime.read_config_once(settle_s=0)
        moved_at = time.monotonic()
        # The move is done when the read returns: the same model, the same loaded
        # versions, nothing loading.
        assert runtime.served("mnist") is served
        assert all(a is b for a, b in zip(served.manager.loaded, loaded, strict=True))
        assert not runtime._loading
        [status] = runtime.models()
        assert (status.labels, status.label_errors) == ((("canary", 2), ("stable", 1)), ())
        assert runtime.version_of(types.ModelRef("mnist", label="canary")) == 2
        assert runtime.version_of(types.ModelRef("mnist", label="latest")) == 2
        assert runtime.version_of(types.ModelRef("mnist", version=1)) == 1
        await until("traffic on version 2", lambda: count(2) >= 12)

        # Version 3 is not on disk yet: the label is refused and stays on version 2.
        write_config(config, (("canary", 3), ("stable", 1)), versions=(1, 2, 3))
        assert await runtime.read_config_once(settle_s=0)
        [status] = runtime.models()
        assert status.labels == (("canary", 2), ("stable", 1))
        assert status.label_errors == (
            "model mnist: version label 'canary' -> 3 not applied: version 3 is not loaded "
            "(loaded: 1, 2); 'canary' stays on version 2",
        )
        before = len(answered)
        await until("more traffic on version 2", lambda: len(answered) >= before + 12)

        # Once version 3 loads, the label takes it.
        shutil.copytree(tmp_path / "mnist" / "1", tmp_path / "mnist" / "3")
        await runtime.poll_once("mnist")
        [status] = runtime.models()
        assert (status.labels, status.label_errors) == ((("canary", 3), ("stable", 1)), ())
        await until("traffic on version 3", lambda: count(3) >= 12)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    try:
        assert not failures, failures
        # Every request that started after the move was answered by version 2 or later.
        assert {v for begun, v in answered if begun > moved_at} <= {2, 3}
        # Three loads in all: versions 1 and 2 at start-up, 3 when it appeared.
        assert value(metrics, "convserve_model_loads_total", model="mnist", result="success") == 3
        # The other requests by label: metadata and feature maps of the labelled version.
        stable = types.ModelRef("mnist", label="stable")
        assert runtime.metadata(stable).serving_version == 3
        maps = await runtime.feature_maps(
            types.FeatureMapsInput(request.images[:1], model=stable), deadline=None
        )
        assert (maps.model_name, maps.model_version) == ("mnist", 1)
        with pytest.raises(errors.NotFound, match="no version label 'beta'"):
            await runtime.predict(
                types.PredictInput(request.images, types.ModelRef("mnist", label="beta")),
                deadline=None,
            )
    finally:
        await runtime.stop(5)


@pytest.mark.slow
async def test_labels_of_a_model_still_loading_its_new_definition_move_on_both(
    model_base_path: Path, tmp_path: Path
) -> None:
    config = two_versions(model_base_path, tmp_path)
    write_config(config, (("canary", 1),), versions=(1,))
    settings = make_settings(
        tmp_path, model_config_file=config, engine_workers="thread", version_settle_s=0
    )
    runtime, _ = await started_runtime(settings)
    try:
        old = runtime.served("mnist")
        # A new definition (another policy) loads in the background; a labels-only edit
        # applied before it has loaded reaches the old model serving and the new one
        # loading (both applied in one turn of the event loop: the load has not begun).
        write_config(config, (("canary", 1),), versions=(1, 2))
        runtime.apply_config(read_model_config_file(config))
        write_config(config, (("canary", 2),), versions=(1, 2))
        runtime.apply_config(read_model_config_file(config))
        assert runtime.served("mnist") is old
        assert (
            "model mnist: version label 'canary' -> 2 not applied" in (old.status().label_errors[0])
        )
        loading = runtime._loading["mnist"]
        await loading
        new = runtime.served("mnist")
        assert new is not old
        [status] = runtime.models()
        assert (status.labels, status.label_errors) == ((("canary", 2),), ())
        assert new.manager.resolve(types.ModelRef(label="canary")).version == 2
    finally:
        await runtime.stop(5)


# -- over gRPC ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_server(
    model_base_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server of model "mnist" (versions 1 and 2) with stable -> 1 and canary -> 2;
    its gRPC target."""
    from convserve.server.settings import Settings

    config = two_versions(model_base_path, tmp_path_factory.mktemp("labelled"))
    write_config(config, (("canary", 2), ("stable", 1)))
    settings = Settings(
        model_config_file=config,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        rest_port=0,
        engine_workers="thread",
        version_settle_s=0,
    )
    with serving(settings) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def channel(labelled_server: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(labelled_server) as ch:
        yield ch


def tf_spec(label: str) -> dict[str, str]:
    return {"name": "mnist", "version_label": label}


@pytest.mark.slow
@pytest.mark.parametrize(("label", "version"), [("canary", 2), ("stable", 1), ("latest", 2)])
def test_tfserving_requests_by_label(
    channel: grpc.Channel,
    sample_digits: tuple[np.ndarray, np.ndarray],
    label: str,
    version: int,
) -> None:
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest(model_spec=tf_spec(label))
    request.model_spec.signature_name = "predict_uint8"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(sample_digits[0][:3]))
    response = prediction.Predict(request, timeout=60)
    # Answers name the version that served, as TF Serving's do.
    assert (response.model_spec.name, response.model_spec.version.value) == ("mnist", version)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (3, 10)

    metadata = prediction.GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=tf_spec(label), metadata_field=["signature_def"]
        ),
        timeout=60,
    )
    assert metadata.model_spec.version.value == version

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=tf_spec(label)), timeout=60
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (version, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]


@pytest.mark.slow
def test_tfserving_unknown_label_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=tf_spec("beta")), timeout=60
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert exc.value.details() == (
        "model 'mnist' has no version label 'beta' (its labels: 'canary', 'stable'; "
        "'latest' names the serving version)"
    )


@pytest.mark.slow
def test_convserve_client_by_label(
    labelled_server: str, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = sample_digits[0][:2]
    with ConvServeClient(labelled_server) as client:
        canary = client.predict(images, model="mnist", version_label="canary")
        stable = client.predict(images, model="mnist", version_label="stable")
        maps = client.feature_maps(images[0], model="mnist", version_label="stable")
        listing = client.list_models()
        with pytest.raises(NotFoundError, match="no version label 'beta'"):
            client.predict(images, model="mnist", version_label="beta")
        with pytest.raises(InputError, match="give one or neither"):
            client.predict(images, model="mnist", model_version=1, version_label="canary")
    assert (canary.model_version, stable.model_version, maps.model_version) == (2, 1, 1)
    [model] = listing.models
    assert (model.labels, model.label_errors) == ((("canary", 2), ("stable", 1)), ())


@pytest.mark.slow
async def test_stream_predictions_by_label(
    labelled_server: str, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = sample_digits[0][:2]
    async with (
        AsyncConvServeClient(labelled_server) as client,
        client.predict_stream(model="mnist") as stream,
    ):
        canary = await stream.predict(images, version_label="canary")
        stable = await stream.predict(images, version_label="stable")
        with pytest.raises(NotFoundError, match="no version label 'beta'"):
            await stream.predict(images, version_label="beta")
    assert (canary.model_version, stable.model_version) == (2, 1)


@pytest.mark.slow
def test_convserve_version_and_label_together_are_invalid(
    channel: grpc.Channel, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    request = convserve_pb2.PredictRequest(
        model_spec=convserve_pb2.ModelSpec(name="mnist", version=1, version_label="canary"),
        images=to_tensor(sample_digits[0][:1][..., np.newaxis]),
    )
    with pytest.raises(grpc.RpcError) as exc:
        stub.Predict(request, timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("model_spec: a version or a version_label expected")
