import argparse

import pytest

from vitrine.config import (
    ConfigError,
    add_overrides_option,
    from_mapping,
    load_params,
    load_paths,
    params_block,
    parse_override,
    set_dotted,
)


@params_block
class Inner:
    tiers: tuple[tuple[int, float], ...]
    names: tuple[str, ...]
    rate: float = 0.5


def test_nested_and_fixed_shape_tuples():
    cfg = from_mapping(Inner, {"tiers": [[6, 0.95], [20, 1]], "names": ["a", "b"]})
    assert cfg == Inner(((6, 0.95), (20, 1.0)), ("a", "b"), 0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiers": [[6, 0.95, 3]], "names": []}, "expected 2 items"),
        ({"tiers": [["six", 0.95]], "names": []}, "expected int"),
        ({"tiers": [], "names": [], "colour": "red"}, "unknown key"),
        ({"names": []}, "missing key 'tiers'"),
    ],
)
def test_bad_params_are_refused_with_the_key_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Inner, data, "block")


def test_the_repository_params_load():
    params = load_params()
    paths = load_paths(params)
    assert paths.collected.as_posix() == "data/collected"


def test_overrides_parse_as_yaml_and_set_only_existing_keys():
    key, value = parse_override("candidates.cnn64.augment=[{name: HorizontalFlip}]")
    assert (key, value) == ("candidates.cnn64.augment", [{"name": "HorizontalFlip"}])
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        parse_override("train.lr")
    parser = argparse.ArgumentParser()
    add_overrides_option(parser)
    args = parser.parse_args(["-S", "train.trainer.devices=2", "--set", "train.lr=1e-3"])
    assert args.overrides == [("train.trainer.devices", 2), ("train.lr", 0.001)]
    params = {"train": {"lr": 0.1, "trainer": {"devices": 1}}}
    set_dotted(params, "train.trainer.devices", 2)
    assert params == {"train": {"lr": 0.1, "trainer": {"devices": 2}}}
    for typo, missing in [("train.lrr", "train.lrr"), ("train.lr.x", "train.lr.x"), ("t.lr", "t")]:
        with pytest.raises(ConfigError, match=rf"params\.yaml has no key '{missing}'"):
            set_dotted(params, typo, 0)


def test_an_override_keeps_the_kind_of_value_params_yaml_has():
    """`-S candidates.cnn64.lr=abc` is refused before a run, not by the stage that reads it."""
    params = {"train": {"lr": 0.1, "devices": 1, "augment": [], "name": "x", "cache": None}}
    for key, value in [("lr", 1), ("devices", 0.5), ("augment", [1]), ("cache", "c"), ("lr", None)]:
        set_dotted(params, f"train.{key}", value)
    for key, value, kind in [("lr", "abc", "a number"), ("augment", "x", "a list")]:
        with pytest.raises(ConfigError, match=f"train.{key}: expected {kind} as params.yaml has"):
            set_dotted({"train": {"lr": 0.1, "augment": []}}, f"train.{key}", value)
    with pytest.raises(ConfigError, match="expected a boolean"):
        set_dotted({"train": {"fsync": True}}, "train.fsync", 1)


def test_params_load_with_overrides_applied_in_order(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  trainer: {devices: 1}\n")
    overrides = [("train.lr", 0.01), ("train.trainer.devices", 2), ("train.lr", 0.001)]
    assert load_params(path, overrides) == {"train": {"lr": 0.001, "trainer": {"devices": 2}}}
    with pytest.raises(ConfigError, match=r"no key 'train\.epochs'"):
        load_params(path, [("train.epochs", 3)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a mapping of blocks, got NoneType"),
        ("classes: [laptop, ' Laptop', phone]\n", r"each class once .*\[' Laptop', 'laptop'\]"),
        ("classes: [laptop]\n", "at least two classes"),
    ],
)
def test_params_that_no_stage_could_run_are_refused_at_load(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(path)


def test_a_block_check_reads_as_one_sentence_naming_the_block():
    from stages.prepare import PrepareConfig

    block = {"classes": ["a", "b"], "image_size": 128, "seed": 1}
    for fractions, message in [
        ((0.9, 0.5), "prepare: val_fraction + test_fraction must be in (0, 1)"),
        ((0.0, 0.2), "prepare: val_fraction and test_fraction must each be > 0"),
    ]:
        data = block | dict(zip(("val_fraction", "test_fraction"), fractions, strict=True))
        with pytest.raises(ConfigError) as err:
            from_mapping(PrepareConfig, data, "prepare")
        assert str(err.value) == message  # not pydantic's "expected Value error, ..., got {...}"


def test_a_stage_says_a_bad_setting_in_one_line(tmp_path):
    """run_cli: a ConfigError is one line on stderr and exit status 1, not a traceback."""
    import subprocess
    import sys

    from tests.helpers import REPO

    (tmp_path / "params.yaml").write_text("classes: [phone, phone]\n")
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "prepare: classes: each class once (ignoring case and spaces), ['phone'] repeat"
    ]


def test_a_missing_or_broken_params_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"no params.yaml at {tmp_path}: not a project folder"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("classes: [phone, laptop\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"params.yaml \(line 2\): not YAML, expected ','"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("command", ["monitor", "flows", "feedback", "heatmaps"])
def test_a_flow_given_a_folder_that_is_no_project_says_so_in_one_line(tmp_path, command):
    """Before any flow run starts: Prefect would log the error's whole traceback first."""
    import subprocess
    import sys

    from tests.helpers import REPO

    done = subprocess.run(
        [sys.executable, "-m", f"pipeline.{command}", str(tmp_path / "nowhere")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    expected = f"{command}: no params.yaml at {tmp_path / 'nowhere'}: not a project folder"
    assert done.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize(
    ("stage", "block", "key", "value", "message"),
    [
        ("collect", "CollectConfig", "shard_size", 0, "collect.shard_size: expected a value >= 1"),
        ("validate", "ValidateConfig", "max_quarantine_rate", 1.5, "a value <= 1"),
        ("dedupe", "DedupeConfig", "tiers", [[6, 1.5]], "cosine -1 to 1"),
        ("dedupe", "DedupeConfig", "embedding_batch_size", 0, "a value >= 1"),
        ("prepare", "PrepareConfig", "image_size", 0, "prepare.image_size: expected a value >= 1"),
    ],
)
def test_a_setting_out_of_its_range_is_refused_with_its_key(stage, block, key, value, message):
    """A shard of 0 photos, a quarantine rate of 150%, a cosine above 1: refused at load, not
    run into a wrong result or an error that names no key."""
    import importlib

    from vitrine.config import stage_config

    params = load_params()
    params[stage][key] = value
    config_class = getattr(importlib.import_module(f"stages.{stage}"), block)
    with pytest.raises(ConfigError, match=message):
        stage_config(config_class, stage, params)
