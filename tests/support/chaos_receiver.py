"""A receiver in a process of its own, for tests that kill it mid-pull.

`python -m tests.support.chaos_receiver CATALOG NAME CASE VERSION` builds an HF engine for `CASE`
(tests.support.hf_models) and pulls `VERSION` of `NAME` again and again (staged whole), printing
`pulling` before and `done` after each pull, until it is killed.
"""

from __future__ import annotations

import sys


def main(catalog: str, name: str, case: str, version: int) -> None:
    from refit import Receiver
    from refit.engines import HFEngine
    from tests.support import hf_models as hm

    engine_model = hm.build_hf_model(hm.get_case(case), seed=7)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=name, direct=False) as rcv:
        while True:
            sys.stdout.write("pulling\n")
            sys.stdout.flush()
            rcv.update_weights(version=version, timeout_s=120.0)
            sys.stdout.write("done\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
