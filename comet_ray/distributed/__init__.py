"""Ray layers over the plain-PyTorch core: Ray Train (train.py), Ray Tune (tune/), Ray Jobs (submit.py).

Nothing is imported eagerly: the CLI imports ``comet_ray.distributed.submit`` on every call, and
importing Ray Train costs seconds.
"""
