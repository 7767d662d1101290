from dataclasses import dataclass

import pytest

from vitrine.config import ConfigError, from_mapping, load_params, load_paths


@dataclass(frozen=True)
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
