"""Counting a running process's instructions with callgrind, between two points.

A process started under ``valgrind --tool=callgrind --instr-atstart=no`` costs
nothing to count until `Callgrind.start`; `Callgrind.stop` dumps and returns the
instructions (Ir) spent in between. Instruction counts repeat to within a
fraction of a percent where CPU time here swings by tens of percent.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path


def callgrind_argv(out_prefix: str) -> list[str]:
    """The valgrind prefix for a command whose counting `Callgrind` switches on and off."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_prefix}.%p"]


class Callgrind:
    """callgrind_control on a running valgrind'ed process: zero, count, dump, read the total."""

    def __init__(self, pid: int, out_prefix: str):
        self.pid, self.out_prefix = pid, out_prefix

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], capture_output=True, check=True)

    def start(self) -> None:
        self._control("-z")
        self._control("-i", "on")

    def stop(self) -> int:
        self._control("-i", "off")
        before = set(glob.glob(self.out_prefix + "*"))
        self._control("-d")
        for _ in range(50):
            new = set(glob.glob(self.out_prefix + "*")) - before
            if new:
                time.sleep(0.2)  # let the dump finish writing
                text = Path(max(new, key=os.path.getmtime)).read_text()
                return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("totals:"))
            time.sleep(0.1)
        raise RuntimeError("callgrind wrote no dump")
