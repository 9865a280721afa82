"""The --model flag and the TF Serving model config file, as typed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from convserve.server.model_config import (
    MAX_VERSION,
    ModelConfigError,
    ModelEntry,
    VersionPolicy,
    check_unique,
    label_problem,
    parse_model_config,
    parse_model_flag,
    read_model_config_file,
)

AVAILABLE = [1, 2, 5, 9]

EXAMPLE = """
# Three models, one of each policy kind.
model_config_list {
  config { name: "mnist" base_path: "/models/mnist" model_platform: "tensorflow"
           model_version_policy { latest { num_versions: 2 } } }
  config { name: "fashion" base_path: "/models/fashion" model_version_policy { all {} } }
  config { name: "digits8" base_path: "/models/digits8"
           model_version_policy { specific { versions: 1 versions: 3 } } }
}
"""


def one(body: str) -> str:
    """A config file text with a single model whose fields are `body`."""
    return f'model_config_list {{ config {{ name: "m" base_path: "/models/m" {body} }} }}'


def error_of(text: str, source: str = "models.conf") -> str:
    with pytest.raises(ModelConfigError) as caught:
        parse_model_config(text, source=source)
    return str(caught.value)


# --- VersionPolicy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "selected"),
    [
        (VersionPolicy("latest"), [9]),
        (VersionPolicy("latest", num_versions=2), [5, 9]),
        (VersionPolicy("latest", num_versions=4), [1, 2, 5, 9]),
        (VersionPolicy("latest", num_versions=10), [1, 2, 5, 9]),
        (VersionPolicy("all"), [1, 2, 5, 9]),
        (VersionPolicy("specific", versions=(1, 3)), [1]),
        (VersionPolicy("specific", versions=(2, 9)), [2, 9]),
        (VersionPolicy("specific", versions=(3, 4)), []),
    ],
)
def test_select(policy: VersionPolicy, selected: list[int]) -> None:
    assert policy.select(AVAILABLE) == selected


def test_select_sorts_and_deduplicates_what_is_available() -> None:
    assert VersionPolicy("latest", num_versions=2).select([9, 1, 5, 9, 2]) == [5, 9]
    assert VersionPolicy("all").select([9, 1, 5, 9]) == [1, 5, 9]
    assert VersionPolicy("specific", versions=(9, 1)).select([9, 5, 1]) == [1, 9]


def test_select_with_nothing_available() -> None:
    assert VersionPolicy("latest", num_versions=3).select([]) == []
    assert VersionPolicy("all").select([]) == []
    assert VersionPolicy("specific", versions=(1,)).select([]) == []


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (VersionPolicy("latest"), "latest 1"),
        (VersionPolicy("latest", num_versions=2), "latest 2"),
        (VersionPolicy("all"), "all"),
        (VersionPolicy("specific", versions=(3, 1)), "specific [1, 3]"),
    ],
)
def test_describe(policy: VersionPolicy, text: str) -> None:
    assert policy.describe() == text


def test_specific_versions_are_sorted_and_deduplicated() -> None:
    policy = VersionPolicy("specific", versions=(9, 3, 9, 1))
    assert policy.versions == (1, 3, 9)
    assert policy == VersionPolicy("specific", versions=(1, 3, 9))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "newest"}, "'newest'"),
        ({"kind": "latest", "num_versions": 0}, "num_versions must be in 1..1000, got 0"),
        ({"kind": "latest", "num_versions": 1001}, "num_versions must be in 1..1000, got 1001"),
        ({"kind": "latest", "num_versions": True}, "must be an int"),
        ({"kind": "all", "num_versions": 2}, "num_versions applies to latest only"),
        ({"kind": "latest", "versions": (1,)}, "versions apply to specific only"),
        ({"kind": "specific"}, "at least one version expected"),
        ({"kind": "specific", "versions": (0,)}, f"versions must be in 1..{MAX_VERSION}, got 0"),
        ({"kind": "specific", "versions": (MAX_VERSION + 1,)}, str(MAX_VERSION + 1)),
    ],
)
def test_version_policy_refuses_inconsistent_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ModelConfigError, match="version policy") as caught:
        VersionPolicy(**kwargs)
    assert fragment in str(caught.value)


def test_largest_version_is_accepted() -> None:
    assert VersionPolicy("specific", versions=(MAX_VERSION,)).versions == (2**63 - 1,)


# --- --model NAME=BASE_PATH ------------------------------------------------------------


def test_flag() -> None:
    assert parse_model_flag("mnist=/models/mnist") == ModelEntry("mnist", Path("/models/mnist"))


def test_flag_keeps_a_relative_path_relative_to_the_working_directory() -> None:
    entry = parse_model_flag("digits8=models/digits8")
    assert entry.base_path == Path("models/digits8")
    assert not entry.base_path.is_absolute()
    assert entry.policy is None


def test_flag_splits_at_the_first_equals_sign() -> None:
    assert parse_model_flag("a=/m/x=y").base_path == Path("/m/x=y")


@pytest.mark.parametrize("text", ["", "mnist", "=/models/mnist", "mnist=", "="])
def test_flag_needs_name_and_path(text: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_model_flag(text)
    assert str(caught.value) == f"--model: NAME=BASE_PATH expected, got {text!r}"


@pytest.mark.parametrize("text", ["mnist=   ", "mnist=\t", "mnist= \n "])
def test_flag_refuses_a_blank_path(text: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_model_flag(text)
    assert str(caught.value) == (
        "--model: BASE_PATH: missing; the directory holding the model's numbered versions expected"
    )


def test_flag_name_rules_apply() -> None:
    with pytest.raises(ModelConfigError, match=r"^--model: NAME: 'my model' is not a valid"):
        parse_model_flag("my model=/m")
    with pytest.raises(ModelConfigError, match=r"^--model: NAME: 'conv2d' is reserved"):
        parse_model_flag("conv2d=/m")


def test_flag_refuses_a_nul_in_the_path() -> None:
    with pytest.raises(ModelConfigError, match=r"^--model: BASE_PATH: .* NUL character"):
        parse_model_flag("a=/m\0x")


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "9", "mnist", "Fashion-MNIST_v2.1", "x" * 128, "conv2d2"])
def test_valid_names(name: str) -> None:
    assert ModelEntry(name, Path("/m")).name == name
    text = f'model_config_list {{ config {{ name: "{name}" base_path: "/m" }} }}'
    assert [entry.name for entry in parse_model_config(text)] == [name]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "missing;"),
        ("x" * 129, "129 characters is too long"),
        ("-a", "'-a' is not a valid model name"),
        (".hidden", "'.hidden' is not a valid model name"),
        ("_a", "'_a' is not a valid model name"),
        ("a b", "'a b' is not a valid model name"),
        ("a/b", "'a/b' is not a valid model name"),
        ("a:b", "'a:b' is not a valid model name"),
        ("é", "'é' is not a valid model name"),
        ("a\\n", "is not a valid model name"),
        ("conv2d", "'conv2d' is reserved"),
    ],
)
def test_invalid_names_name_the_field(name: str, fragment: str) -> None:
    message = error_of(
        'model_config_list { config { name: "ok" base_path: "/m" }'
        f' config {{ name: "{name}" base_path: "/m" }} }}'
    )
    assert message.startswith("models.conf: model_config_list.config[1].name: ")
    assert fragment in message


def test_reserved_name_is_the_oip_built_in_model() -> None:
    from convserve.server.model_config import RESERVED_NAMES
    from convserve.server.protocols.oip_convert import CONV_MODEL

    assert CONV_MODEL in RESERVED_NAMES


def test_model_entry_checks_its_name() -> None:
    with pytest.raises(ModelConfigError, match=r"^model name: 'a b' is not a valid model name"):
        ModelEntry("a b", Path("/m"))


HEALTH_RESERVED = (
    "is reserved (the server's own gRPC health service of that name); choose another name"
)


@pytest.mark.parametrize("name", ["liveness", "readiness"])
def test_health_service_names_are_reserved(name: str) -> None:
    message = error_of(
        'model_config_list { config { name: "ok" base_path: "/m" }'
        f' config {{ name: "{name}" base_path: "/m" }} }}'
    )
    assert message == f"models.conf: model_config_list.config[1].name: {name!r} {HEALTH_RESERVED}"
    with pytest.raises(ModelConfigError) as caught:
        parse_model_flag(f"{name}=/m")
    assert str(caught.value) == f"--model: NAME: {name!r} {HEALTH_RESERVED}"
    with pytest.raises(ModelConfigError) as caught:
        ModelEntry(name, Path("/m"))
    assert str(caught.value) == f"model name: {name!r} {HEALTH_RESERVED}"


@pytest.mark.parametrize("name", ["Liveness", "READINESS", "liveness2", "readiness-v2"])
def test_names_near_the_health_names_are_fine(name: str) -> None:
    # Health service names are compared exactly, so only the exact names would collide.
    assert ModelEntry(name, Path("/m")).name == name
    assert parse_model_flag(f"{name}=/m").name == name


def test_health_names_are_the_servers() -> None:
    from convserve.server.app import LIVENESS, READINESS
    from convserve.server.model_config import HEALTH_NAMES

    assert {LIVENESS, READINESS} == HEALTH_NAMES


# --- config text -----------------------------------------------------------------------


def test_example_config() -> None:
    assert parse_model_config(EXAMPLE) == [
        ModelEntry("mnist", Path("/models/mnist"), VersionPolicy("latest", num_versions=2)),
        ModelEntry("fashion", Path("/models/fashion"), VersionPolicy("all")),
        ModelEntry("digits8", Path("/models/digits8"), VersionPolicy("specific", versions=(1, 3))),
    ]


@pytest.mark.parametrize(
    "text", ["", "   \n", "# nothing yet\n", "model_config_list {}", "model_config_list { }\n"]
)
def test_empty_config_is_no_models(text: str) -> None:
    assert parse_model_config(text) == []


def test_relative_base_path_is_returned_as_written() -> None:
    assert parse_model_config(one(""))[0].base_path == Path("/models/m")
    text = 'model_config_list { config { name: "m" base_path: "models/m" } }'
    assert parse_model_config(text)[0].base_path == Path("models/m")


def test_no_policy_is_the_server_default() -> None:
    assert parse_model_config(one(""))[0].policy is None


@pytest.mark.parametrize(
    ("body", "policy"),
    [
        ("model_version_policy {}", VersionPolicy("latest", num_versions=1)),
        ("model_version_policy { latest {} }", VersionPolicy("latest", num_versions=1)),
        ("model_version_policy { latest { num_versions: 0 } }", VersionPolicy("latest")),
        ("model_version_policy { latest { num_versions: 3 } }", VersionPolicy("latest", 3)),
        ("model_version_policy { latest { num_versions: 1000 } }", VersionPolicy("latest", 1000)),
        ("model_version_policy { all {} }", VersionPolicy("all")),
        (
            "model_version_policy { specific { versions: 5 versions: 1 versions: 5 } }",
            VersionPolicy("specific", versions=(1, 5)),
        ),
        (
            f"model_version_policy {{ specific {{ versions: {MAX_VERSION} }} }}",
            VersionPolicy("specific", versions=(MAX_VERSION,)),
        ),
    ],
)
def test_policies(body: str, policy: VersionPolicy) -> None:
    assert parse_model_config(one(body))[0].policy == policy


def test_duplicates_are_removed_from_specific_versions() -> None:
    body = "model_version_policy { specific { versions: [3, 1, 3, 1] } }"
    policy = parse_model_config(one(body))[0].policy
    assert policy is not None
    assert policy.versions == (1, 3)
    assert policy.select(AVAILABLE) == [1]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "model_version_policy { latest { num_versions: 1001 } }",
            "models.conf: model_config_list.config[0].model_version_policy.latest.num_versions:"
            " 1001 is too many; 1..1000 expected (0 or unset means 1)",
        ),
        (
            "model_version_policy { specific {} }",
            "models.conf: model_config_list.config[0].model_version_policy.specific.versions:"
            " at least one version expected",
        ),
        (
            "model_version_policy { specific { versions: 2 versions: 0 } }",
            "models.conf: model_config_list.config[0].model_version_policy.specific.versions[1]:"
            f" 0 is not a model version; 1..{MAX_VERSION} expected",
        ),
        (
            "model_version_policy { specific { versions: -4 } }",
            "models.conf: model_config_list.config[0].model_version_policy.specific.versions[0]:"
            f" -4 is not a model version; 1..{MAX_VERSION} expected",
        ),
    ],
)
def test_bad_policies_name_the_field(body: str, expected: str) -> None:
    assert error_of(one(body)) == expected


def test_negative_num_versions_is_a_parse_error() -> None:
    # num_versions is a uint32, so text_format itself refuses a negative value.
    message = error_of(one("model_version_policy { latest { num_versions: -1 } }"))
    assert message.startswith("models.conf: not a TensorFlow Serving ModelServerConfig")
    assert "1:" in message
    assert "-1" in message


def test_version_beyond_int64_is_a_parse_error() -> None:
    message = error_of(
        one(f"model_version_policy {{ specific {{ versions: {MAX_VERSION + 1} }} }}")
    )
    assert message.startswith("models.conf: not a TensorFlow Serving ModelServerConfig")
    assert "out of range" in message


@pytest.mark.parametrize("platform", ["", "tensorflow"])
def test_tensorflow_platform(platform: str) -> None:
    assert parse_model_config(one(f'model_platform: "{platform}"'))[0].name == "m"


@pytest.mark.parametrize("platform", ["pytorch", "TensorFlow", "tensorflow "])
def test_other_platforms_are_refused(platform: str) -> None:
    assert error_of(one(f'model_platform: "{platform}"')) == (
        f"models.conf: model_config_list.config[0].model_platform: {platform!r} is not"
        ' supported; "tensorflow" or nothing expected'
    )


def test_deprecated_model_type() -> None:
    assert parse_model_config(one("model_type: TENSORFLOW"))[0].name == "m"
    assert error_of(one("model_type: OTHER")).startswith(
        "models.conf: model_config_list.config[0].model_type: only TENSORFLOW is supported"
    )
    assert error_of(one('model_type: TENSORFLOW model_platform: "tensorflow"')).startswith(
        "models.conf: model_config_list.config[0].model_type: set together with model_platform"
    )


def test_missing_base_path_names_the_field() -> None:
    text = 'model_config_list { config { name: "a" base_path: "/a" } config { name: "b" } }'
    assert error_of(text) == (
        "models.conf: model_config_list.config[1].base_path: missing; the directory holding"
        " the model's numbered versions expected"
    )


# base_path as written in the text format: blanks, a tab, a newline.
@pytest.mark.parametrize("base_path", ["   ", "\\t", " \\n "])
def test_blank_base_path_names_the_field(base_path: str) -> None:
    text = (
        'model_config_list { config { name: "a" base_path: "/a" }'
        f' config {{ name: "b" base_path: "{base_path}" }} }}'
    )
    assert error_of(text) == (
        "models.conf: model_config_list.config[1].base_path: missing; the directory holding"
        " the model's numbered versions expected"
    )


def test_nul_in_base_path_names_the_field() -> None:
    text = 'model_config_list { config { name: "a" base_path: "/a\\000b" } }'
    assert error_of(text).startswith(
        "models.conf: model_config_list.config[0].base_path: '/a\\x00b' contains a NUL character"
    )


def test_duplicate_names_in_a_file() -> None:
    text = (
        "model_config_list {"
        ' config { name: "a" base_path: "/a" }'
        ' config { name: "b" base_path: "/b" }'
        ' config { name: "a" base_path: "/c" } }'
    )
    assert error_of(text) == (
        "models.conf: model_config_list.config[2].name: 'a' is already the name of"
        " model_config_list.config[0]; model names must be unique"
    )


def test_names_differing_in_case_are_distinct() -> None:
    text = (
        'model_config_list { config { name: "a" base_path: "/a" }'
        ' config { name: "A" base_path: "/b" } }'
    )
    assert [entry.name for entry in parse_model_config(text)] == ["a", "A"]


# --- version labels ----------------------------------------------------------------


def labels_of(body: str) -> tuple[tuple[str, int], ...]:
    [entry] = parse_model_config(one(body))
    return entry.labels


def test_version_labels_are_read_sorted_by_label() -> None:
    body = (
        "model_version_policy { specific { versions: 1 versions: 2 } }"
        ' version_labels { key: "stable" value: 1 }'
        ' version_labels { key: "canary" value: 2 }'
        ' version_labels { key: "Z.9_x-y" value: 2 }'
    )
    assert labels_of(body) == (("Z.9_x-y", 2), ("canary", 2), ("stable", 1))


def test_no_version_labels_is_none() -> None:
    assert labels_of("") == ()
    assert parse_model_flag("m=/models/m").labels == ()


def test_a_repeated_label_takes_its_last_value() -> None:
    # The text format's rule for map entries: the last one written wins.
    body = 'version_labels { key: "canary" value: 1 } version_labels { key: "canary" value: 3 }'
    assert labels_of(body) == (("canary", 3),)


@pytest.mark.parametrize("label", ["a", "7", "stable", "latest", "v1.2-rc_3", "A" * 64, "x-", "x."])
def test_valid_label_names(label: str) -> None:
    assert labels_of(f'version_labels {{ key: "{label}" value: 1 }}') == ((label, 1),)
    assert label_problem(label) is None


LABEL_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit expected"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ('"x y"', '["x y"]: not a valid version label; ' + LABEL_RULE),
        ('""', '[""]: empty; ' + LABEL_RULE),
        ('"-canary"', '["-canary"]: not a valid version label; ' + LABEL_RULE),
        ('"_canary"', '["_canary"]: not a valid version label; ' + LABEL_RULE),
        ('"a/b"', '["a/b"]: not a valid version label; ' + LABEL_RULE),
        ('"caf\\303\\251"', '["caf\\u00e9"]: not a valid version label; ' + LABEL_RULE),
        ('"a\\nb"', '["a\\nb"]: not a valid version label; ' + LABEL_RULE),
        ('"' + "a" * 65 + '"', f'["{"a" * 65}"]: 65 characters is too long; ' + LABEL_RULE),
    ],
)
def test_bad_label_names_name_the_field(key: str, expected: str) -> None:
    body = f"version_labels {{ key: {key} value: 1 }}"
    prefix = "models.conf: model_config_list.config[0].version_labels"
    assert error_of(one(body)) == prefix + expected


def test_a_very_long_label_is_cut_in_the_message() -> None:
    message = error_of(one(f'version_labels {{ key: "{"a" * 5000}" value: 1 }}'))
    assert '…" (5000 characters)]: 5000 characters is too long' in message
    assert len(message) < 400


@pytest.mark.parametrize("version", [0, -1, -(2**63)])
def test_label_versions_must_be_positive(version: int) -> None:
    body = f'version_labels {{ key: "canary" value: {version} }}'
    assert error_of(one(body)) == (
        'models.conf: model_config_list.config[0].version_labels["canary"]:'
        f" {version} is not a model version; 1..{MAX_VERSION} expected"
    )


def test_the_largest_label_version_is_accepted() -> None:
    assert labels_of(f'version_labels {{ key: "far" value: {MAX_VERSION} }}') == (
        ("far", MAX_VERSION),
    )


def test_label_errors_name_the_model_they_belong_to() -> None:
    text = (
        'model_config_list { config { name: "a" base_path: "/a" }'
        ' config { name: "b" base_path: "/b" version_labels { key: "ok" value: 1 }'
        ' version_labels { key: "not ok" value: 2 } } }'
    )
    assert error_of(text).startswith(
        'models.conf: model_config_list.config[1].version_labels["not ok"]: '
    )


def test_model_entry_checks_and_sorts_its_labels() -> None:
    entry = ModelEntry("m", Path("/m"), labels=(("stable", 1), ("canary", 2)))
    assert entry.labels == (("canary", 2), ("stable", 1))
    assert entry == ModelEntry("m", Path("/m"), labels=(("canary", 2), ("stable", 1)))
    with pytest.raises(ModelConfigError, match=r'version label "x y": not a valid'):
        ModelEntry("m", Path("/m"), labels=(("x y", 1),))
    with pytest.raises(ModelConfigError, match=r'"canary": a version in 1\.\..* expected, got 0'):
        ModelEntry("m", Path("/m"), labels=(("canary", 0),))
    with pytest.raises(ModelConfigError, match=r'"canary": given more than once'):
        ModelEntry("m", Path("/m"), labels=(("canary", 1), ("canary", 2)))


def test_entries_differing_only_in_labels() -> None:
    base = ModelEntry("m", Path("/m"), VersionPolicy("all"), labels=(("canary", 1),))
    assert base.same_but_labels(ModelEntry("m", Path("/m"), VersionPolicy("all")))
    assert base.same_but_labels(base)
    assert not base.same_but_labels(ModelEntry("m", Path("/n"), VersionPolicy("all")))
    assert not base.same_but_labels(ModelEntry("m", Path("/m"), labels=(("canary", 1),)))
    assert not base.same_but_labels(ModelEntry("n", Path("/m"), VersionPolicy("all")))


def test_labels_survive_reading_a_file(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text(
        'model_config_list { config { name: "a" base_path: "a"'
        ' version_labels { key: "canary" value: 2 } } }',
        encoding="utf-8",
    )
    [entry] = read_model_config_file(path)
    assert (entry.base_path, entry.labels) == (tmp_path / "a", (("canary", 2),))


def test_logging_config_is_refused() -> None:
    message = error_of(one("logging_config { }"))
    assert message.startswith(
        "models.conf: model_config_list.config[0].logging_config: not supported by convserve"
    )


def test_custom_model_config_is_refused() -> None:
    text = 'custom_model_config { type_url: "type.googleapis.com/x.Y" value: "" }'
    message = error_of(text)
    assert message.startswith("models.conf: custom_model_config is not supported;")
    assert "model_config_list" in message


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        (one("bogus: 1"), "1:", 'has no field named "bogus"'),
        ('model_config_list {\n  config {\n    name: "a"\n', "3:11", 'Expected "}"'),
        ('model_config_list {\n  config { name: "a" name: "b" }\n}', "2:", 'multiple "name"'),
        ("\n\nnot_a_field {}", "3:1", 'has no field named "not_a_field"'),
        (
            "model_config_list {}\ncustom_model_config {}",
            "2:",
            "another member of oneof",
        ),
    ],
)
def test_parse_errors_carry_source_and_position(text: str, position: str, fragment: str) -> None:
    message = error_of(text, source="/etc/convserve/models.conf")
    prefix = (
        "/etc/convserve/models.conf: not a TensorFlow Serving ModelServerConfig in text format: "
    )
    assert message.startswith(prefix)
    assert message[len(prefix) :].startswith(position)
    assert fragment in message


def test_default_source() -> None:
    with pytest.raises(ModelConfigError, match=r"^model config: model_config_list\.config\[0\]"):
        parse_model_config('model_config_list { config { name: "a" } }')


# --- files -----------------------------------------------------------------------------


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text(EXAMPLE, encoding="utf-8")
    assert read_model_config_file(path) == parse_model_config(EXAMPLE)


def test_relative_base_path_is_relative_to_the_file(tmp_path: Path) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    path = config_dir / "models.conf"
    path.write_text(
        "model_config_list {"
        ' config { name: "a" base_path: "models/a" }'
        ' config { name: "b" base_path: "../b" }'
        ' config { name: "c" base_path: "/abs/c" } }',
        encoding="utf-8",
    )
    entries = read_model_config_file(path)
    assert [entry.base_path for entry in entries] == [
        config_dir / "models/a",
        config_dir / "../b",
        Path("/abs/c"),
    ]


def test_relative_file_path_gives_absolute_base_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "models.conf").write_text(
        'model_config_list { config { name: "a" base_path: "a" } }', encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    [entry] = read_model_config_file(Path("conf/models.conf"))
    assert entry.base_path == tmp_path / "conf" / "a"
    assert entry.base_path.is_absolute()


def test_base_path_need_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text('model_config_list { config { name: "a" base_path: "later" } }')
    [entry] = read_model_config_file(path)
    assert entry.base_path == tmp_path / "later"
    assert not entry.base_path.exists()


def test_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_bytes(b'\xef\xbb\xbfmodel_config_list { config { name: "a" base_path: "/a" } }')
    assert read_model_config_file(path) == [ModelEntry("a", Path("/a"))]


def test_empty_file_is_no_models(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text("")
    assert read_model_config_file(path) == []


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text('model_config_list { config { name: "conv2d" base_path: "/m" } }')
    with pytest.raises(ModelConfigError) as caught:
        read_model_config_file(path)
    assert str(caught.value).startswith(
        f"{path}: model_config_list.config[0].name: 'conv2d' is reserved"
    )


def test_blank_base_path_in_a_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_text('model_config_list { config { name: "a" base_path: "   " } }')
    with pytest.raises(ModelConfigError) as caught:
        read_model_config_file(path)
    # Resolved against the file's directory, "   " would have named a directory beside it.
    assert str(caught.value) == (
        f"{path}: model_config_list.config[0].base_path: missing; the directory holding"
        " the model's numbered versions expected"
    )


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    from convserve.server.model_config import MAX_CONFIG_BYTES

    path = tmp_path / "models.conf"
    # Comments only: at the limit it is read (and lists no models); a byte more is not.
    line = "#" * 1023 + "\n"
    path.write_text(line * (MAX_CONFIG_BYTES // 1024))
    assert path.stat().st_size == MAX_CONFIG_BYTES == 16 << 20
    assert read_model_config_file(path) == []
    with path.open("a") as out:
        out.write("#")
    with pytest.raises(ModelConfigError) as caught:
        read_model_config_file(path)
    assert str(caught.value) == f"{path}: larger than 16777216 bytes"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.conf"
    with pytest.raises(ModelConfigError) as caught:
        read_model_config_file(path)
    assert str(caught.value) == (
        f"{path}: cannot read the model config file: No such file or directory"
    )


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="cannot read the model config file") as caught:
        read_model_config_file(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: ")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "models.conf"
    path.write_bytes(b'model_config_list { config { name: "\xff" } }')
    with pytest.raises(ModelConfigError) as caught:
        read_model_config_file(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (invalid start byte at byte 36)"


# --- uniqueness across flags -----------------------------------------------------------


def test_check_unique_accepts_distinct_names() -> None:
    entries = [parse_model_flag("a=/a"), parse_model_flag("b=/b")]
    check_unique(entries, source="--model")
    check_unique([], source="--model")


def test_check_unique_refuses_a_repeated_name() -> None:
    entries = [parse_model_flag(text) for text in ("a=/a", "b=/b", "c=/c", "b=/other")]
    with pytest.raises(ModelConfigError) as caught:
        check_unique(entries, source="--model")
    assert str(caught.value) == (
        "--model: model name 'b' is given more than once (entries 2 and 4);"
        " model names must be unique"
    )
