"""The `membrane` console script. Start-up creates many objects and frees almost none, so
the cyclic garbage collector only wastes time while the command line's modules import
(~5 ms of a ~90 ms start); it runs again before the command does, which may be a daemon."""

from __future__ import annotations

import gc


def run() -> None:
    gc.disable()
    try:
        from membrane.cli.main import main
    finally:
        gc.enable()
    main()
