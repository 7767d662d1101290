"""benchmarks/options.py: a benchmark's numeric option out of range stops it with argparse's
one-line error, before any work starts, instead of a traceback or a meaningless figure."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from benchmarks.options import (
    at_least,
    non_negative_float,
    positive_float,
    share,
    sizes,
    sizes_or_none,
)
from tests.helpers import REPO


def test_at_least_parses_integers_from_its_bound_up() -> None:
    assert at_least(1)("1") == 1 and at_least(0)("0") == 0 and at_least(2)(" 12 ") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1, got '0'"):
        at_least(1)("0")


@pytest.mark.parametrize("text", ["-1", "2.5", "abc", ""])
def test_at_least_refuses_what_is_not_an_integer_in_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        at_least(0)(text)


def test_the_float_types_take_finite_numbers_in_their_range() -> None:
    assert positive_float("0.5") == 0.5 and positive_float("15") == 15.0
    assert non_negative_float("0") == 0.0
    assert share("1") == 1.0 and share("0.01") == 0.01


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (positive_float, "0"),
        (positive_float, "-3"),
        (positive_float, "inf"),
        (positive_float, "nan"),
        (non_negative_float, "-0.1"),
        (non_negative_float, "nan"),
        (share, "0"),
        (share, "1.5"),
        (share, "x"),
    ],
)
def test_the_float_types_refuse_the_rest(parse, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
        parse(text)


def test_sizes_are_positive_integers_separated_by_commas() -> None:
    assert sizes("192,160,128") == [192, 160, 128] and sizes("240") == [240]
    assert sizes_or_none("") == [] and sizes_or_none("1,2") == [1, 2]
    for text in ("abc", "", "192,,128", "192,0", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            sizes(text)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["benchmarks/score.py", "--repeat", "0"], "argument --repeat: expected an integer >= 1"),
        (["benchmarks/train_cpu.py", "--sides", "abc"], "argument --sides: expected positive"),
    ],
)
def test_a_benchmark_refuses_a_bad_value_with_argparse_usage_error(
    args: list[str], error: str
) -> None:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{args[0].split('/')[1]}: error: {error}")
