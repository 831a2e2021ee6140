"""The one build step pyproject.toml cannot declare: a wheel carries the x86_64 syscall
table generated from the build machine's UAPI header, for machines without the header
(membrane.trace.syscall_table reads the header itself wherever it is installed)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).parent / "src"))
from membrane.trace.syscall_table import GENERATED, HEADER, write_table


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # a source checkout reads the header at run time
        out = Path(self.build_lib, "membrane", "trace", GENERATED.name)
        if HEADER.exists():
            write_table(HEADER, out)
        else:
            self.warn(
                f"{HEADER} missing (linux-libc-dev): the wheel carries no syscall "
                "table; syscall tools will need the header where it is installed"
            )


setup(cmdclass={"build_py": BuildPy})
