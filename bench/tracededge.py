"""`fanout` under tracemalloc, for bench/memory.py `--tracemalloc`: each SIGUSR1 writes a
snapshot of the Python heap (after a full collection) to `<prefix>.<n>`, n = 0, 1, ...

    python bench/tracededge.py PREFIX FRAMES edge [fanout edge flags...]
"""

from __future__ import annotations

import gc
import signal
import sys
import tracemalloc
from types import FrameType


def main() -> int:
    if len(sys.argv) < 4:  # `make bench` runs every bench/*.py: this is not a benchmark
        print("bench/tracededge.py: the traced edge of bench/memory.py --tracemalloc "
              "(PREFIX FRAMES edge [flags])")
        return 0
    prefix, frames, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    tracemalloc.start(frames)
    taken = 0

    def snapshot(sig: int, frame: FrameType | None) -> None:
        nonlocal taken
        gc.collect()
        tracemalloc.take_snapshot().dump(f"{prefix}.{taken}")
        taken += 1

    signal.signal(signal.SIGUSR1, snapshot)
    from fanout.cli import main as fanout_main

    return fanout_main(argv)


if __name__ == "__main__":
    sys.exit(main())
