"""``comet-ray export``: a checkpoint as one ONNX or TorchScript graph (comet_ray.export, imported when used: torch)."""

from __future__ import annotations

import argparse

FORMATS = ("onnx", "torchscript")  # comet_ray.export.FORMATS, without importing torch to parse


def cmd_export(args: argparse.Namespace) -> int:
    from comet_ray.export import export_detector

    target = export_detector(args.checkpoint, args.out, args.format, args.opset)
    print(
        f"exported {args.format}: images [B, 3, S, S] (normalised) -> scores [B], maps [B, S, S] -> {target}"
    )
    return 0


def register(subparsers) -> None:
    """Add ``comet-ray export`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "export",
        help="write backbone + detector + anomaly maps as one ONNX or TorchScript graph",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="model.pt or a run folder")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="graph format")
    parser.add_argument("--out", required=True, help="output file, e.g. model.onnx or model.torchscript.pt")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.set_defaults(func=cmd_export)
