"""The first tunnel check, now a shortcut into the full harness: W2 (bulk bytes through one
upgraded tunnel, each direction and both at once), plain TCP, DIRECT against rawproxy only.

    python benchmarks/tunnel_quick.py [--mib 512] [--runs 5]

is `python -m benchmarks --only W2 --legs plain --targets rawproxy --w2-mib 512 --runs 5`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runner import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sys.exit(
        main(
            [
                *("--only", "W2", "--legs", "plain", "--targets", "rawproxy"),
                *("--quiet-wait", "0", "--w2-mib", str(args.mib), "--runs", str(args.runs)),
            ]
        )
    )
