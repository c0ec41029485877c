"""comet-ray: CoMet anomaly detection from uncurated image sets, in plain PyTorch with thin Ray layers."""

__version__ = "0.1.0"
