"""The ``convserve`` command, run in-process through main(argv), against fake servers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from convserve.client.bench_requests import synthetic_digits
from convserve.client.cli import main

from .fakes import Behaviour, RunningFake, nothing_listens, serve_fake
from .test_client import numbered_images
from .test_images import png_header_only


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture
def digits_npz(tmp_path: Path) -> Path:
    """Three images predicted as 0, 1, 2 by the fake; labels 0, 1, 5."""
    path = tmp_path / "digits.npz"
    np.savez(path, images=numbered_images(3), labels=np.array([0, 1, 5]))
    return path


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "exit codes:" in out
    assert "3  the server rejected" in out
    code, out, _ = run(capsys, "predict", "--help")
    assert code == 0
    assert "5  authentication failed" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == 2
    assert run(capsys, "predict")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2


def test_predict_table_with_labels(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, digits_npz: Path, tmp_path: Path
) -> None:
    npy = tmp_path / "one.npy"
    np.save(npy, numbered_images(8)[7])
    code, out, _ = run(capsys, "predict", str(digits_npz), str(npy), "--target", fake.target)
    assert code == 0
    top3 = "{}:0.910  {}:0.010  {}:0.010"
    assert out.splitlines() == [
        "file        index  class  label  confidence  top-3                      expected  match",
        "----------  -----  -----  -----  ----------  -------------------------  --------  -----",
        "digits.npz      0      0  0          0.9100  " + top3.format(0, 1, 2) + "         0  yes",
        "digits.npz      1      1  1          0.9100  " + top3.format(1, 0, 2) + "         1  yes",
        "digits.npz      2      2  2          0.9100  " + top3.format(2, 0, 1) + "         5  NO",
        "one.npy         0      7  7          0.9100  " + top3.format(7, 0, 1) + "         -  -",
        "model fake version 7; 2/3 correct (66.7%)",
    ]
    assert fake.behaviour.models == [("GetModelMetadata", ""), ("Predict", "")]


def test_predict_json(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, digits_npz: Path
) -> None:
    code, out, _ = run(capsys, "predict", str(digits_npz), "--target", fake.target, "--json")
    assert code == 0
    data = json.loads(out)
    assert [p["class_index"] for p in data["predictions"]] == [0, 1, 2]
    assert [p["digit"] for p in data["predictions"]] == [0, 1, 2]
    assert [p["label"] for p in data["predictions"]] == ["0", "1", "2"]
    assert [p["expected"] for p in data["predictions"]] == [0, 1, 5]
    assert [p["match"] for p in data["predictions"]] == [True, True, False]
    assert data["accuracy"] == pytest.approx(2 / 3)
    assert data["predictions"][0]["top3"][0] == {
        "class_index": 0,
        "label": "0",
        "probability": pytest.approx(0.91),
    }


def test_predict_with_a_model_prints_its_class_names(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    npy = tmp_path / "clothes.npy"
    np.save(npy, numbered_images(10)[8:])
    argv = ["predict", str(npy), "--model", "fashion", "--target", fake.target]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out.splitlines() == [
        "file         index  class  label       confidence  top-3",
        "-" * 11 + "  -----  -----  " + "-" * 10 + "  " + "-" * 10 + "  " + "-" * 50,
        "clothes.npy      0      8  Bag             0.9100  Bag:0.910  T-shirt/top:0.010  "
        "Trouser:0.010",
        "clothes.npy      1      9  Ankle boot      0.9100  Ankle boot:0.910  T-shirt/top:0.010  "
        "Trouser:0.010",
        "model fashion version 1",
    ]
    code, out, _ = run(capsys, *argv, "--json")
    (first, second) = json.loads(out)["predictions"]
    assert (first["class_index"], first["label"]) == (8, "Bag")
    assert second["top3"][0] == {
        "class_index": 9,
        "label": "Ankle boot",
        "probability": pytest.approx(0.91),
    }
    assert {name for _, name in fake.behaviour.models} == {"fashion"}


def test_predict_reads_files_in_the_model_input_shape(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    small = np.zeros((2, 8, 8), np.uint8)
    small[:, 0, 0] = [3, 14]
    np.save(tmp_path / "small.npy", small)
    stroke = np.full((90, 60), 255, np.uint8)
    stroke[20:70, 25:35] = 0
    Image.fromarray(stroke).save(tmp_path / "one.png")
    code, out, _ = run(
        capsys, "predict", str(tmp_path / "small.npy"), str(tmp_path / "one.png"),
        "--model", "digits8", "--target", fake.target,
    )  # fmt: skip
    assert code == 0
    assert [line.split()[:4] for line in out.splitlines()[2:4]] == [
        ["small.npy", "0", "3", "3"],
        ["small.npy", "1", "4", "4"],
    ]
    assert out.splitlines()[4].split()[:2] == ["one.png", "-"]
    assert fake.behaviour.shapes == [(3, 8, 8, 1)]
    # 28x28 arrays do not fit the 8x8 model: refused before predicting.
    np.save(tmp_path / "big.npy", numbered_images(2))
    code, _, err = run(
        capsys, "predict", str(tmp_path / "big.npy"), "--model", "digits8", "--target", fake.target
    )
    assert code == 2
    assert "big.npy: images: shape must be [N,8,8,1], [N,8,8], [N,64]" in err
    assert fake.behaviour.calls["Predict"] == 1


def test_predict_image_files_are_sent_as_mnist_digits(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    digit = np.full((90, 60), 255, np.uint8)
    digit[20:70, 25:35] = 0  # a black "1" on white paper
    png = tmp_path / "one.png"
    Image.fromarray(digit).save(png)
    code, out, _ = run(capsys, "predict", str(png), "--target", fake.target, "--batch-size", "1")
    assert code == 0
    assert out.splitlines()[2].split()[:2] == ["one.png", "-"]
    assert fake.behaviour.dtypes == ["uint8"]
    assert fake.behaviour.images == [1]


def test_predict_batch_size_splits_requests(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    path = tmp_path / "many.npy"
    np.save(path, numbered_images(5))
    code, out, _ = run(capsys, "predict", str(path), "--batch-size", "2", "--target", fake.target)
    assert code == 0
    assert fake.behaviour.images == [2, 2, 1]
    assert [line.split()[2] for line in out.splitlines()[2:7]] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "missing.png: no such file"),
        ("text.png", b"not an image", "text.png: not an image file"),
        ("bad.npy", b"not numpy", "bad.npy: not a numpy .npy file"),
        ("shape.npy", "shape", r"shape.npy: images: shape must be"),
        ("nolabels.npz", "pixels", "nolabels.npz: no 'images' array"),
        ("labels.npz", "labels", "labels.npz: 2 labels for 3 images"),
    ],
)
def test_predict_bad_input_files_exit_2(
    capsys: pytest.CaptureFixture[str],
    fake: RunningFake,
    tmp_path: Path,
    name: str,
    content: object,
    message: str,
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "shape":
        np.save(path, np.zeros((2, 5, 5)))
    elif content == "pixels":
        np.savez(path, pixels=numbered_images(1))
    elif content == "labels":
        np.savez(path, images=numbered_images(3), labels=np.array([1, 2]))
    code, _, err = run(capsys, "predict", str(path), "--target", fake.target)
    assert code == 2
    assert err.startswith("convserve predict: error: ")
    assert message.split(":")[0] in err
    assert _search(message, err)
    # Unreadable files fail before any call; the others once the input shape is known.
    read_against_the_model = content in ("shape", "labels")
    assert fake.behaviour.calls == ({"GetModelMetadata": 1} if read_against_the_model else {})


@pytest.mark.parametrize("command", ["predict", "convolve"])
def test_huge_or_corrupt_images_exit_2_before_any_call(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path, command: str
) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 10000))
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_header_only(40, 30))
    for path, message in (
        (huge, f"{huge}: image is 20000x10000 (200,000,000 pixels), more than the limit of "),
        (broken, f"{broken}: cannot read image"),
    ):
        if command == "predict":
            argv = [str(path)]
        else:
            argv = ["--input", str(path), "--kernel", "[[1]]", "--output", str(tmp_path / "o.npy")]
        code, out, err = run(capsys, command, *argv, "--target", fake.target)
        assert code == 2
        assert err.startswith(f"convserve {command}: error: {message}")
        assert len(err.strip().splitlines()) == 1
        assert out == ""
    assert fake.behaviour.calls == {}
    code, out, _ = run(capsys, "predict", "--help")
    assert "at most 50,000,000 pixels" in " ".join(out.split())


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_exit_codes_for_server_errors(capsys: pytest.CaptureFixture[str], digits_npz: Path) -> None:
    with serve_fake(Behaviour(max_images=1)) as fake:
        code, out, err = run(capsys, "predict", str(digits_npz), "--target", fake.target, "--json")
        assert code == 3
        assert "INVALID_ARGUMENT" in err
        assert json.loads(out) == {
            "error": {"code": "INVALID_ARGUMENT", "message": err.split("error: ", 1)[1].strip()},
            "exit_code": 3,
        }
        assert run(capsys, "metadata", "--target", fake.target, "--model", "nope")[0] == 3
        code, _, err = run(
            capsys, "predict", str(digits_npz), "--target", fake.target, "--model", "nope"
        )
        assert code == 3
        assert "NOT_FOUND: model 'nope' not found" in err
        code, _, err = run(capsys, "metadata", "--target", fake.target, "--model", "broken")
        assert code == 4
        assert "UNAVAILABLE: model 'broken' has no usable version" in err
    with nothing_listens() as unreachable:
        code, _, err = run(capsys, "health", "--target", unreachable, "--retries", "0")
    assert code == 4
    assert "UNAVAILABLE" in err
    with serve_fake(Behaviour(token="right")) as fake:
        assert run(capsys, "metadata", "--target", fake.target, "--token", "wrong")[0] == 5
        assert run(capsys, "metadata", "--target", fake.target, "--token", "right")[0] == 0


def test_token_from_file_and_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("right\n")
    with serve_fake(Behaviour(token="right")) as fake:
        monkeypatch.setenv("CONVSERVE_TARGET", fake.target)
        assert run(capsys, "metadata", "--token-file", str(token_file))[0] == 0
        monkeypatch.setenv("CONVSERVE_TOKEN", "right")
        assert run(capsys, "metadata")[0] == 0
        missing = tmp_path / "missing"
        code, _, err = run(capsys, "metadata", "--token-file", str(missing))
        assert code == 2
        assert "cannot read token" in err


def test_tls_flags(capsys: pytest.CaptureFixture[str], certs: object, tmp_path: Path) -> None:
    import grpc

    from .conftest import Certs

    assert isinstance(certs, Certs)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())]
    )
    with serve_fake(credentials=credentials) as fake:
        code, out, _ = run(capsys, "health", "--target", fake.target, "--tls-ca", str(certs.ca))
        assert code == 0
        assert out.strip() == "SERVING"
        code, _, err = run(capsys, "health", "--target", fake.target, "--tls-cert", str(certs.ca))
        assert code == 2
        assert "--tls-cert and --tls-key must be given together" in err
        code, _, err = run(capsys, "health", "--target", fake.target, "--tls-ca", "nope.pem")
        assert code == 2
        assert "nope.pem: no such file" in err


def test_convolve_npy_and_json(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.arange(9.0).reshape(3, 3))
    out_path = tmp_path / "y.npy"
    args = ["convolve", "--input", str(x), "--kernel", "[[0,1],[2,3]]", "--target", fake.target]
    code, out, _ = run(capsys, *args, "--output", str(out_path))
    assert code == 0
    assert "[[19. 25.]" in out
    assert "output [2, 2] float64" in out
    np.testing.assert_array_equal(np.load(out_path), [[19, 25], [37, 43]])
    code, out, _ = run(capsys, *args, "--bias", "1", "--output", str(out_path), "--json")
    data = json.loads(out)
    assert code == 0
    assert data["values"] == [[20, 26], [38, 44]]
    assert data["shape"] == [2, 2]
    code, out, _ = run(capsys, *args, "--mode", "convolution", "--output", str(out_path))
    assert code == 0
    assert "[[ 5. 11.]" in out


def test_convolve_png_in_and_out(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    image = np.zeros((6, 8), np.uint8)
    image[:, :4] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    out_png = tmp_path / "edges.png"
    code, _, _ = run(
        capsys, "convolve", "--input", str(tmp_path / "in.png"), "--kernel", "[[1,-1]]",
        "--output", str(out_png), "--target", fake.target,
    )  # fmt: skip
    assert code == 0
    edges = np.asarray(Image.open(out_png))
    assert edges.shape == (6, 7)
    assert (edges[:, 3] == 255).all()
    assert (edges[:, [0, 1, 2, 4, 5, 6]] == 0).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kernel", "[[1,"], "--kernel: expected a JSON array"),
        (["--kernel", "[[1],[2,3]]"], "--kernel: expected a rectangular array"),
        (["--kernel", "k.npy"], "k.npy: no such file"),
        (["--kernel", "[[1]]", "--padding", "1,2"], "--padding"),
        (["--kernel", "[[1]]", "--stride", "a"], "--stride: expected comma-separated integers"),
        (["--kernel", "[[1]]", "--output", "out.txt"], "--output: expected a .npy or .png"),
    ],
)
def test_convolve_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str],
    fake: RunningFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.ones((3, 3)))
    argv = ["convolve", "--input", "x.npy", "--output", "y.npy", *extra, "--target", fake.target]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_fit_kernel(capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((6, 8)))
    np.save(tmp_path / "y.npy", np.zeros((6, 7)))
    argv = [
        "fit-kernel", "--inputs", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"),
        "--kernel-shape", "1,2", "--fit-bias", "--steps", "100", "--target", fake.target,
    ]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "kernel [1, 2]:" in out
    assert "[[0.  0.1]]" in out
    assert "bias: [0.5]" in out
    assert "steps: 3 (max_steps)" in out
    assert "loss: 1 -> 0.125" in out
    assert out.splitlines()[-1].split() == ["3", "0.125"]
    code, out, _ = run(capsys, *argv, "--json")
    data = json.loads(out)
    assert data["kernel"] == [[0.0, 0.1]]
    assert data["loss"] == [1.0, 0.5, 0.25, 0.125]
    code, _, err = run(capsys, *argv[:6], "1,2,3", "--target", fake.target)
    assert code == 2
    assert "--kernel-shape: expected 2 or 4 values" in err


def test_feature_maps(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    image = tmp_path / "digit.npy"
    np.save(image, numbered_images(1))
    out_dir = tmp_path / "maps"
    code, out, _ = run(
        capsys, "feature-maps", str(image), "--output", str(out_dir), "--scale", "2",
        "--target", fake.target,
    )  # fmt: skip
    assert code == 0
    assert "conv1" in out
    assert "26x26x4" in out
    conv1 = np.asarray(Image.open(out_dir / "00_conv1.png"))
    conv2 = np.asarray(Image.open(out_dir / "01_conv2.png"))
    assert conv1.shape == (2 * (2 * 26 + 1), 2 * (2 * 26 + 1))  # 2x2 grid of 4 maps
    assert conv2.shape == (2 * 11, 2 * (2 * 11 + 1))  # 1x2 grid of 2 maps
    code, out, _ = run(
        capsys, "feature-maps", str(image), "--output", str(out_dir), "--layers", "conv2",
        "--json", "--target", fake.target,
    )  # fmt: skip
    assert json.loads(out)["feature_maps"] == [
        {"layer": "conv2", "shape": [11, 11, 2], "file": str(out_dir / "00_conv2.png")}
    ]


def test_feature_maps_of_another_model(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    stroke = np.full((40, 40), 255, np.uint8)
    stroke[5:35, 18:22] = 0
    Image.fromarray(stroke).save(tmp_path / "one.png")
    code, out, _ = run(
        capsys, "feature-maps", str(tmp_path / "one.png"), "--output", str(tmp_path / "maps"),
        "--model", "digits8", "--json", "--target", fake.target,
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert (data["model_name"], data["model_version"]) == ("digits8", 1)
    assert [m["shape"] for m in data["feature_maps"]] == [[6, 6, 4], [1, 1, 2]]
    assert fake.behaviour.shapes == [(1, 8, 8, 1)]
    assert fake.behaviour.models == [("GetModelMetadata", "digits8"), ("GetFeatureMaps", "digits8")]


def test_metadata(capsys: pytest.CaptureFixture[str], fake: RunningFake) -> None:
    code, out, _ = run(capsys, "metadata", "--target", fake.target)
    assert code == 0
    assert "model fake, serving version 7 (loaded: 6, 7) on /CPU:0" in out
    assert "input images: uint8|float32 (None, 28, 28, 1)" in out
    assert any(
        line.split()[:5] == ["conv1", "(Conv2D)", "(None,", "26,", "26,"]
        for line in out.splitlines()
    )
    assert "Total params: 1,250" in out
    assert "test accuracy 0.9000" in out
    assert "classes:" not in out
    assert "confusion matrix" not in out
    code, out, _ = run(capsys, "metadata", "--target", fake.target, "--json")
    data = json.loads(out)
    assert data["layers"][1]["parameters"] == 1210
    assert data["training"]["dataset"] == "sample"
    assert data["training"]["confusion_matrix"] is None
    assert data["class_names"] == []


def test_metadata_of_a_model_with_class_names_and_confusion_matrix(
    capsys: pytest.CaptureFixture[str], fake: RunningFake
) -> None:
    code, out, _ = run(capsys, "metadata", "--model", "rgb", "--target", fake.target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "model rgb, serving version 3 (loaded: 3) on /CPU:0"
    assert "input images: uint8|float32 (None, 4, 4, 3)" in lines
    assert "classes: 0 red, 1 green, 2 blue" in lines
    start = lines.index("confusion matrix (rows: true class, columns: predicted class):")
    assert lines[start + 1 :] == [
        "   0  1  2",
        "-  -  -  -",
        "0  5  1  0",
        "1  0  6  0",
        "2  1  0  4",
    ]
    code, out, _ = run(capsys, "metadata", "--model", "rgb", "--target", fake.target, "--json")
    data = json.loads(out)
    assert data["class_names"] == ["red", "green", "blue"]
    assert data["training"]["confusion_matrix"] == [[5, 1, 0], [0, 6, 0], [1, 0, 4]]
    assert data["inputs"][0]["shape"] == [-1, 4, 4, 3]
    assert fake.behaviour.models == [("GetModelMetadata", "rgb"), ("GetModelMetadata", "rgb")]


def test_models_table_and_json(capsys: pytest.CaptureFixture[str], fake: RunningFake) -> None:
    code, out, _ = run(capsys, "models", "--target", fake.target)
    assert code == 0
    assert out.splitlines() == [
        "model    ready  serving  versions                  labels               memory  errors",
        "-------  -----  -------  " + "-" * 24 + "  " + "-" * 17 + "  --------  " + "-" * 54,
        "broken   no           -  1 END                     -                         -  "
        "no version loads; 1: no serving_default signature",
        "digits8  yes          1  1 AVAILABLE, 2 LOADING    -                         -  -",
        "fake     yes          7  6 AVAILABLE, 7 AVAILABLE  canary=7 stable=6  96.0 MiB  "
        "label 'next' -> 8 not applied: version 8 is not loaded",
        "fashion  yes          1  1 AVAILABLE               -                         -  -",
        "rgb      yes          3  3 AVAILABLE               -                         -  -",
        "default model: fake",
    ]
    code, out, _ = run(capsys, "--json", "models", "--target", fake.target)
    assert code == 0
    data = json.loads(out)
    assert data["default_model"] == "fake"
    assert [m["name"] for m in data["models"]] == ["broken", "digits8", "fake", "fashion", "rgb"]
    assert data["models"][0] == {
        "name": "broken",
        "ready": False,
        "serving_version": None,
        "error": "no version loads",
        "memory_bytes": 0,
        "labels": {},
        "label_errors": [],
        "versions": [
            {
                "version": 1,
                "state": "END",
                "serving": False,
                "error": "no serving_default signature",
            }
        ],
    }
    assert data["models"][1]["versions"] == [
        {"version": 1, "state": "AVAILABLE", "serving": True, "error": ""},
        {"version": 2, "state": "LOADING", "serving": False, "error": ""},
    ]
    assert data["models"][1]["serving_version"] == 1
    assert data["models"][2]["labels"] == {"canary": 7, "stable": 6}
    assert data["models"][2]["label_errors"] == [
        "label 'next' -> 8 not applied: version 8 is not loaded"
    ]
    assert fake.behaviour.calls == {"ListModels": 2}


def test_model_flag_is_accepted_by_every_model_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("predict", "feature-maps", "metadata", "bench"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        assert "--model NAME" in out, command


def test_health(capsys: pytest.CaptureFixture[str], fake: RunningFake) -> None:
    code, out, _ = run(capsys, "health", "--target", fake.target, "--json")
    assert code == 0
    assert json.loads(out)["status"] == "SERVING"
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, out, _ = run(capsys, "health", "--target", fake.target, "--wait-s", "0.3")
    assert code == 4
    assert out.strip() == "NOT_SERVING"


def test_connection_flags_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str], fake: RunningFake
) -> None:
    code, out, _ = run(capsys, "--target", fake.target, "--json", "health")
    assert code == 0
    assert json.loads(out)["status"] == "SERVING"
    # After the command wins over before it.
    with nothing_listens() as unreachable:
        code, out, _ = run(capsys, "--target", unreachable, "health", "--target", fake.target)
        assert (code, out.strip()) == (0, "SERVING")
        code, _, err = run(capsys, "--target", fake.target, "health", "--target", unreachable)
    assert code == 4
    assert "UNAVAILABLE" in err


def test_bench_table_and_json(
    capsys: pytest.CaptureFixture[str], fake: RunningFake, tmp_path: Path
) -> None:
    images = tmp_path / "digits.npz"
    np.savez(images, images=synthetic_digits(4)[0])
    base = ["bench", "--target", fake.target, "--duration-s", "0.5", "--warmup-s", "0.1"]
    code, out, _ = run(capsys, *base, "--concurrency", "1,2", "--images", str(images))
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["load", "requests"]
    assert lines[3].startswith("closed c=1")
    assert lines[4].startswith("closed c=2")
    assert "generator CPU: up to" in out
    code, out, _ = run(capsys, *base, "--rate", "20", "--images-per-request", "3", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["images_per_request"] == 3
    (phase,) = data["phases"]
    assert phase["mode"] == "open"
    assert phase["requests_ok"] == 10
    assert phase["images_per_s"] == pytest.approx(3 * phase["requests_per_s"])
    assert set(fake.behaviour.images) == {1, 3}
    code, _, err = run(capsys, *base, "--concurrency", "0")
    assert code == 2
    assert "every value must be positive" in err
    code, _, err = run(capsys, *base, "--protocol", "oip")
    assert code == 2
    assert "needs --model" in err


def test_bench_model_selects_the_model_for_both_protocols(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_fake(oip=True) as fake:
        base = [
            "bench", "--target", fake.target, "--duration-s", "0.3", "--warmup-s", "0.1",
            "--rate", "10", "--images-per-request", "2", "--model", "digits8", "--json",
        ]  # fmt: skip
        code, out, _ = run(capsys, *base)
        assert code == 0
        assert json.loads(out)["model"] == "digits8"
        code, out, _ = run(capsys, *base, "--protocol", "oip")
        assert code == 0
        assert json.loads(out)["model"] == "digits8"
        assert {name for _, name in fake.behaviour.models} == {"digits8"}
        assert {method for method, _ in fake.behaviour.models} == {
            "GetModelMetadata",
            "Predict",
            "ModelInfer",
        }
        # Synthetic 28x28 digits resized to the model's 8x8 on both protocols.
        assert set(fake.behaviour.shapes) == {(2, 8, 8, 1)}
