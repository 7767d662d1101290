"""Fuzz collect's readers for minutes: the properties of tests/test_collect_properties.py, run
with fresh random examples until the time is up.

    python benchmarks/fuzz_collect.py [--minutes 10] [--batch 50] [--seed 0]

Each property (folder, tar in four compressions, zip, CSV and JSONL catalogs with paths, the
record reader, see tests/helpers/collect_fuzz.py; catalog URL rows against a hostile local
server under each private-network policy, see tests/helpers/url_fuzz.py) runs in turn, a batch
of examples at a time (hypothesis, no example database). A failing example is shrunk, printed
and counted, and the run goes on: a crash is an exception or a broken promise (a row too many
or missing, a read outside the root, a FIFO opened, a record read past max_bytes or over its
memory bound), a hang a source still being read after collect_fuzz.HANG_S seconds. At the end:
examples tried, crashes and hangs per property, the largest memory peak while reading one
record (tracemalloc), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from options import at_least, positive_float  # benchmarks/ is on sys.path as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers import collect_fuzz as fuzz  # noqa: E402
from tests.helpers import url_fuzz  # noqa: E402
from tests.helpers.hostile import Hang  # noqa: E402

CATALOG = st.tuples(
    fuzz.catalog_rows, st.booleans(), fuzz.max_bytes_values, st.sampled_from(fuzz.ENCODINGS)
)
PROPERTIES: dict[str, tuple[st.SearchStrategy[Any], Callable[..., None]]] = {
    "folder": (fuzz.folder_specs(), fuzz.check_folder),
    "tar": (fuzz.tar_specs(), fuzz.check_tar),
    "zip": (fuzz.zip_specs(), fuzz.check_zip),
    "csv": (CATALOG, fuzz.check_csv),
    "jsonl": (CATALOG, fuzz.check_jsonl),
    "raw": (
        st.tuples(st.binary(max_size=4000), st.booleans(), fuzz.max_bytes_values),
        fuzz.check_raw_catalog,
    ),
    "record": (fuzz.record_specs(), fuzz.check_record),
    "url": (
        st.tuples(
            url_fuzz.url_rows,
            url_fuzz.max_bytes_values,
            st.sampled_from(["open", "shipped", "lab"]),
        ),
        url_fuzz.check_url_catalog,
    ),
}


def run_batch(name: str, examples: int, batch_seed: int, last: list[Any]) -> None:
    """`examples` random examples of one property; raises what a failing one raised."""
    strategy, check = PROPERTIES[name]

    @seed(batch_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def prop(spec: tuple) -> None:
        last[:] = [spec]
        check(*spec)

    prop()


def describe(err: BaseException) -> str:
    """The error's first line; for a group (hypothesis' FlakyFailure is one), each member's."""
    members = err.exceptions if isinstance(err, BaseExceptionGroup) else ()
    head = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return "; ".join([head, *(describe(e) for e in members)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=positive_float, default=10.0)
    parser.add_argument(
        "--batch", type=at_least(1), default=50, help="examples per property in turn"
    )
    parser.add_argument("--seed", type=int, default=0, help="the first batch's seed")
    args = parser.parse_args()
    crashes, hangs = Counter[str](), Counter[str]()
    end = time.monotonic() + 60 * args.minutes
    start, batch_seed = time.monotonic(), args.seed
    while time.monotonic() < end:
        for name in PROPERTIES:
            if time.monotonic() >= end:
                break
            last: list[Any] = []
            batch_seed += 1
            try:
                run_batch(name, args.batch, batch_seed, last)
            except Hang as err:
                hangs[name] += 1
                print(f"HANG {name} (seed {batch_seed}): {err}; example {last!r}", flush=True)
            except Exception as err:
                crashes[name] += 1
                print(f"CRASH {name} (seed {batch_seed}): {describe(err)}", flush=True)
    minutes = (time.monotonic() - start) / 60
    print(f"\nfuzzed collect's readers for {minutes:.1f} min")
    print(f"{'property':<10} {'examples':>9} {'crashes':>8} {'hangs':>6}")
    for name in PROPERTIES:
        print(f"{name:<10} {fuzz.STATS[name]:>9} {crashes[name]:>8} {hangs[name]:>6}")
    total = sum(fuzz.STATS[n] for n in PROPERTIES)
    print(f"{'total':<10} {total:>9} {crashes.total():>8} {hangs.total():>6}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"largest memory peak reading one record: {fuzz.STATS['peak'] / 2**20:.1f} MiB")
    print(f"process peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
