"""What the benchmark scripts share: a command's wall time and peak memory, and the CPU."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from up.core.runtime import cpu_model  # noqa: F401 - the benchmarks quote it from here


def run_measured(cmd: list[str], what: str, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``cmd``: the largest resident set of the process
    and its waited-for children (wait4's rusage; ru_maxrss is in KiB on Linux)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def save_report(lines: list[str], out: Path) -> str:
    """Write a benchmark's markdown lines to ``out``; the text, for printing."""
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


class Printed:
    """Lines a benchmark prints, kept to be saved as its report (``--out``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, out: Path | None, argv: list[str]) -> None:
        """The command and its output as a markdown code block in ``out`` (None: skip)."""
        if out is not None:
            save_report(["```", f"$ python {' '.join(argv)}", *self.lines, "```"], out)
