"""A longer fuzz run of the hostile-input properties: python tests/fuzz/fuzz_hostile.py.

The test suite runs each property with a few hundred examples; this script runs
the same properties (imported from the test modules, so there is one definition
of each) with many more, for a deeper search:

    python tests/fuzz/fuzz_hostile.py                 # 20,000 examples per property
    python tests/fuzz/fuzz_hostile.py --examples 500  # what CI runs (test_fuzz_script.py)

A failure prints hypothesis's minimal falsifying example; add it to the property
as an ``@example`` so the suite keeps it as a regression case. Exit status 0 when
every property held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.test_proxy_errors import (
    test_parse_payload_accepts_every_shallow_object,
    test_parse_payload_never_raises_anything_but_InvalidJSON,
)
from tests.test_proxy_hostile_streams import (
    test_StreamTranscript_reads_any_bytes_without_raising,
)
from tests.test_proxy_paths import (
    test_check_target_never_raises_anything_but_InvalidPath,
    test_upstream_path_is_normalised_under_base,
)
from tests.test_statesync_hostile import (
    test_check_value_accepts_or_rejects_never_crashes,
)

PROPERTIES: dict[str, Callable[[], None]] = {
    "path normalisation": test_upstream_path_is_normalised_under_base,
    "request targets": test_check_target_never_raises_anything_but_InvalidPath,
    "request body parsing": test_parse_payload_never_raises_anything_but_InvalidJSON,
    "request body round trip": test_parse_payload_accepts_every_shallow_object,
    "SSE transcript": test_StreamTranscript_reads_any_bytes_without_raising,
    "sync update schema": test_check_value_accepts_or_rejects_never_crashes,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000,
                        help="examples per property (default 20000)")
    args = parser.parse_args(argv)
    # The properties carry no settings of their own, so this profile applies to them.
    settings.register_profile("fuzz", max_examples=args.examples, deadline=None,
                              database=None, suppress_health_check=list(HealthCheck))
    settings.load_profile("fuzz")
    failed = 0
    for name, prop in PROPERTIES.items():
        started = time.perf_counter()
        try:
            prop()
        except Exception:
            failed += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
            continue
        print(f"ok   {name}: {args.examples} examples in {time.perf_counter() - started:.1f}s",
              flush=True)
    print(f"{len(PROPERTIES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
