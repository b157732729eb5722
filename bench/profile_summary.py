"""Where a profiled process spends its CPU: summarize py-spy's collapsed stacks (`--format raw`).

    python bench/profile_summary.py worker-*.txt [--top 25]

Prints self time per function and inclusive time per function (each counted once per stack), as
shares of all samples, so "what costs per chunk" reads straight off.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy frames look like "function (path/to/file.py:123)"; the line number splits a function's
# samples needlessly, so it is dropped.
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    parts = Path(match["file"]).parts
    tail = "/".join(parts[-2:]) if parts else match["file"]
    return f"{match['func']} ({tail})"


def summarize(paths: list[Path]) -> tuple[Counter, Counter, int]:
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = [short(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            total += samples
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    return own, inclusive, total


def report(paths: list[Path], top: int, us_per_chunk: float | None = None) -> str:
    """Self and inclusive shares; with `us_per_chunk`, each share also in microseconds/chunk."""
    own, inclusive, total = summarize(paths)
    if not total:
        return "no samples"
    # The chain every sample shares (gunicorn arbiter, worker, event loop) says nothing.
    root = max(inclusive.values())
    inclusive = Counter({name: n for name, n in inclusive.items() if n < 0.99 * root})

    def line(name: str, samples: int) -> str:
        share = samples / total
        cost = f"{share * us_per_chunk:6.1f}   " if us_per_chunk else ""
        return f"{100 * share:6.1f}   {cost}{name}"

    unit = "us/chunk   " if us_per_chunk else ""
    lines = [f"{total} samples from {len(paths)} file(s)", "", f"self %   {unit}function"]
    lines += [line(name, n) for name, n in own.most_common(top)]
    lines += ["", f"incl %   {unit}function (frames under the event loop)"]
    lines += [line(name, n) for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--us-per-chunk", type=float, help="measured CPU per chunk, to scale by")
    args = parser.parse_args()
    print(report(args.files, args.top, args.us_per_chunk))


if __name__ == "__main__":
    main()
