"""The test suite's S3 server helpers (SeaweedFS ``weed mini`` and a flaky proxy).

The implementation lives in :mod:`comet_ray.testing.s3server` so ``bench/stream.py`` can start the
same server; fixtures are in ``tests/conftest.py`` (``s3_server``, ``s3_env``, ``s3_dataset``).
"""

from comet_ray.testing.s3server import (  # noqa: F401
    FAKE_ACCESS_KEY,
    FAKE_SECRET_KEY,
    FlakyProxy,
    SeaweedServer,
    find_weed,
    free_ports,
)
