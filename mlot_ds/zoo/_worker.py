"""Worker process of :func:`mlot_ds.zoo.build_zoo`: builds one lane of members, then exits.

    python -m mlot_ds.zoo._worker '<json job>'

The job holds the settings (as ``dataclasses.asdict``), the members and the zoo folder of each,
whether to show progress bars, the bar position and the parent's log level.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from mlot_ds.zoo.build import build_lane
from mlot_ds.zoo.settings import ZooSettings


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mlot_ds.zoo._worker '<json job>'", file=sys.stderr)
        return 2
    job = json.loads(argv[0])
    logging.basicConfig(level=job["log_level"], format="%(message)s", stream=sys.stderr)
    roots = {member: Path(root) for member, root in job["roots"].items()}
    build_lane(job["members"], ZooSettings(**job["settings"]), roots, job["progress"], job["position"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
