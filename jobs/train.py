"""RayJob / ``ray job submit`` entry point: ``python jobs/train.py DATA_ROOT --category C --out DIR [...]``.

Exactly ``comet-ray train ...`` (every option of ``comet-ray train --help``), run from the job's
working dir. When ``COMET_RAY_RESULTS_URI=s3://bucket/prefix`` is set (runtime env ``env_vars``), the
``--out`` folder is copied to ``s3://bucket/prefix/<name of --out>`` after a successful run: a RayJob's
cluster is deleted when the job ends, and its local disks with it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds comet_ray/

from comet_ray.cli import run_command

if __name__ == "__main__":
    raise SystemExit(run_command(["train", *sys.argv[1:]]))
