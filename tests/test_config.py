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


def test_params_load_with_overrides_applied_in_order(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  trainer: {devices: 1}\n")
    overrides = [("train.lr", 0.01), ("train.trainer.devices", 2), ("train.lr", 0.001)]
    assert load_params(path, overrides) == {"train": {"lr": 0.001, "trainer": {"devices": 2}}}
    with pytest.raises(ConfigError, match=r"no key 'train\.epochs'"):
        load_params(path, [("train.epochs", 3)])
