"""RayJob / ``ray job submit`` entry point for a Ray Tune sweep: ``python jobs/sweep.py [tune options]``.

Exactly ``comet-ray tune ...`` (see ``comet-ray tune --help``; the command comes with the Ray Tune
layer). As in ``jobs/train.py``, ``COMET_RAY_RESULTS_URI=s3://bucket/prefix`` copies the ``--out``
folder there after a successful sweep.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds comet_ray/

from comet_ray.cli import run_command

if __name__ == "__main__":
    raise SystemExit(run_command(["tune", *sys.argv[1:]]))
