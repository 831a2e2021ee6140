"""The `membrane` console script: the command line's modules are imported with the
collector off and then frozen (cli/frozen_imports.py)."""

from __future__ import annotations

from membrane.cli.frozen_imports import importing_for_good


def run() -> None:
    with importing_for_good():
        from membrane.cli.main import main
    main()
