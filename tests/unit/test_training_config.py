"""What a training run may change, checked as the trainer composes it (issues: data.* overrides
accepted by the API then failing in the trainer; a config-group choice loading a file from
outside the config folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from face_emotions.training_config import CONFIG_DIR
from face_emotions.training_config import OverrideError
from face_emotions.training_config import check_override
from face_emotions.training_config import check_run_config
from face_emotions.training_config import compose_config
from face_emotions.training_config import group_choices
from face_emotions.training_config import hydra_quote


def run_config(tmp_path: Path, *overrides: str):
    return check_run_config(
        list(overrides), data_dir=tmp_path / "faces", output_dir=tmp_path / "out", promote="auto"
    )


def test_groups_are_the_files_of_the_config_folder() -> None:
    choices = group_choices()
    assert set(choices) == {"model", "training", "data", "logging"}
    assert "fast" in choices["training"] and "tensorboard" in choices["logging"]
    assert (CONFIG_DIR / "config.yaml").is_file()


def test_a_valid_run_composes_with_the_services_own_keys(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "training=fast", "training.lr=0.0005", "data.split_seed=3")
    assert cfg.training.lr == 0.0005 and cfg.data.split_seed == 3
    assert cfg.data.path == str(tmp_path / "faces") and cfg.promote == "auto"
    assert cfg.training.progress_bar is False


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.image_size=64", "data.image_size"),  # no such key: the trainer would fail on it
        ("training.lr=fast", "training.lr"),  # wrong type
        ("training.no_such_knob=1", "no_such_knob"),
    ],
)
def test_keys_the_config_does_not_have_are_refused(
    tmp_path: Path, override: str, expected: str
) -> None:
    with pytest.raises(OverrideError, match=expected) as refused:
        run_config(tmp_path, override)
    assert "/" not in str(refused.value), "the error shows a path of the server"


@pytest.mark.parametrize(
    "override",
    [
        "logging=../../../../tmp/x/y",
        "training=/etc/passwd",
        "+logging=../x",
        "logging=mlflow/../../x",
        "training=nonexistent",
    ],
)
def test_a_group_is_chosen_by_one_of_its_names_never_by_a_path(override: str) -> None:
    with pytest.raises(OverrideError, match="must be one of") as refused:
        check_override(override)
    assert "config search path" not in str(refused.value).lower()


#: Forms that reach past a group's names or into the environment (issue 14): Hydra unescapes
#: ``$\\{..\\}`` into an interpolation, adds a group given with ``+``, deletes one with ``~``,
#: and reads ``group@package`` and ``group/sub`` as other groups.
BEYOND_THE_GROUPS = {
    r"+training.note=$\{oc.env:SECRET_FOR_TEST\}": "interpolations",
    r"training.optimizer=[a,{b: $\{oc.env:SECRET_FOR_TEST\}}]": "interpolations",
    "~logging=mlflow": "removing a key or group",
    "~training.lr=0.001": "removing a key or group",
    "+logging=tensorboard": "logging must be one of mlflow, tensorboard, chosen as logging=NAME",
    "++training=fast": "training must be one of default, fast, chosen as training=NAME",
    "logging@_global_=mlflow": "key=value",
    "+logging/x=../../../../tmp/x/y": "no '/' or '@' in the key",
    "+zz/a=../../../../tmp/x/y": "no '/' or '@' in the key",
    "hydra/launcher=basic": "set by the service",
    "logging=mlflow,tensorboard": "sweeps",
    "+defaults=[{logging: ../../../../tmp/x/y}]": "defaults is set by the service",
}


@pytest.mark.parametrize(("override", "fragment"), BEYOND_THE_GROUPS.items())
def test_no_form_reaches_past_a_groups_names_or_into_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, fragment: str
) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "s3cr3t-value")
    for check in (check_override, lambda o: run_config(tmp_path, o)):  # the API's, the trainer's
        with pytest.raises(OverrideError, match=re.escape(fragment)) as refused:
            check(override)
        message = str(refused.value)
        assert "s3cr3t-value" not in message and "search path" not in message.lower()
        assert str(CONFIG_DIR) not in message and str(tmp_path) not in message


#: A refused override -> a fragment of the reason it is given.
OWNED_BY_THE_SERVICE = {
    "data.path=/etc": "set by the service",
    "promote=force": "set by the service",
    "hydra.run.dir=/tmp": "set by the service",
    "output_dir=/tmp": "set by the service",
    "model=resnet18": "'model' field",
    "training.lr=${oc.env:HOME}": "interpolations",
    "not an override": "key=value",
}


@pytest.mark.parametrize(("override", "fragment"), OWNED_BY_THE_SERVICE.items())
def test_what_the_service_owns_is_refused(override: str, fragment: str) -> None:
    with pytest.raises(OverrideError, match=fragment):
        check_override(override)


@pytest.mark.parametrize(
    "path",
    ["/data/a b/c", "/data/it's", "/d/x=y,z", "/d/${oc.env:HOME}", "/d/back\\slash", "/d/end\\"],
)
def test_paths_reach_hydra_literally(path: str) -> None:
    assert compose_config([f"data.path={hydra_quote(path)}"]).data.path == path


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.faces=yes", "data.faces=yes: must be one of detect, none"),
        ("data.no_face=drop", "must be one of keep, skip"),
        ("data.crop_margin=0.5", "must be a number from 1.0 to 3.0"),
        ("data.crop_margin=9", "must be a number from 1.0 to 3.0"),
        ("data.crop_cache=/etc", "data.crop_cache is set by the service"),
    ],
)
def test_face_options_are_checked_at_submission(
    tmp_path: Path, override: str, fragment: str
) -> None:
    with pytest.raises(OverrideError, match=re.escape(fragment)):
        check_run_config([override], data_dir=tmp_path, output_dir=tmp_path / "out", promote="auto")


def test_face_options_compose(tmp_path: Path) -> None:
    overrides = ["data.faces=detect", "data.crop_margin=1.3", "data.crop_align=true"]
    cfg = check_run_config(overrides, data_dir=tmp_path, output_dir=tmp_path / "o", promote="auto")
    assert (cfg.data.faces, cfg.data.crop_margin, cfg.data.crop_align) == ("detect", 1.3, True)
