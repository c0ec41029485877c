"""``comet-ray demo``: the whole product offline in a few minutes on two CPU cores.

It writes a synthetic texture category in which one defect type is common, contaminates the
training set with it (20 %), and trains the plain baseline and CoMet on the same cached features,
so the table it prints compares like with like. It ends with the audit of the CoMet run
(:mod:`comet_ray.audit`): which of the injected images SCL flagged, and the gallery of its top suspects.
"""

from __future__ import annotations

from pathlib import Path

from comet_ray import jsonfile
from comet_ray.config import FeatureConfig, ModelConfig, TrainConfig, resolve_device
from comet_ray.data.synthetic import make_texture_category
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data
from comet_ray.runfolder import write_run


def demo_config(data_root: str, epochs: int, seed: int) -> TrainConfig:
    """Small, fast settings: MobileNetV2 at 128 px, a narrower head; every other knob is the default."""
    config = TrainConfig(
        data_root=data_root,
        category="weave",
        contamination=0.2,
        seed=seed,
        epochs=epochs,
        passes=1,
        batch_size=8,
    )
    config.features = FeatureConfig(backbone="mobilenet_v2", image_size=128, feature_dim=128, batch_size=32)
    config.model = ModelConfig(discriminator_hidden=256)
    config.comet.inner_steps = 2
    config.comet.meta_tasks = 2
    return config


def run_demo(out: str, epochs: int = 8, seed: int = 0, device: str = "auto") -> list[dict]:
    out_dir = Path(out)
    data_root = out_dir / "data"
    if not (data_root / "weave").exists():
        print(f"writing a synthetic category to {data_root / 'weave'}", flush=True)
        make_texture_category(
            data_root, "weave", n_train=60, n_test_good=24, defects={"spot": 40, "scratch": 16}, seed=seed
        )
    torch_device = resolve_device(device)
    config = demo_config(str(data_root), epochs, seed)
    data = prepare_data(config, torch_device, cache_dir=str(out_dir / "feature-cache"), progress=True)
    rows = []
    for strategy in ("baseline", "comet"):
        config.comet.strategy = strategy
        print(
            f"\n== {strategy} ({config.epochs} epochs, contamination {config.contamination:.0%}) ==",
            flush=True,
        )
        result = train_category(
            config, data, torch_device, on_epoch_end=lambda _t, e: print(e.line(config.epochs), flush=True)
        )
        write_run(str(out_dir / strategy), config, data, result)
        rows.append(result.metrics)
    jsonfile.write(out_dir / "summary.json", rows, indent=2)
    return rows


def demo_audit(out: str, device: str = "auto") -> list[str]:
    """Audit the demo's CoMet run (gallery and audit.csv in ``OUT/comet/audit``); returns the lines to print."""
    from comet_ray.audit import GALLERY_DIR, run_audit

    run = Path(out) / "comet"
    outcome = run_audit(str(run), device=device)
    m = outcome.audit.metrics
    precision = "-" if m.get("precision") is None else f"{m['precision']:.2f}"
    found = (
        f"  SCL flagged {m['n_flagged']} of its {m['n_images']} training images: {m['n_flagged_injected']} of "
        f"the {m['n_injected']} injected anomalies (recall {m['recall']:.2f}), precision {precision}; the "
        f"{m['k']} most suspect images hold {round(m['precision_at_k'] * m['k'])} injected (top-{m['k']} "
        f"precision {m['precision_at_k']:.2f})"
    )
    where = (
        f"  gallery of the top suspects: {Path(outcome.out) / GALLERY_DIR}; every image ranked in "
        f"{Path(outcome.out) / 'audit.csv'}"
    )
    lines = [f"training-set audit of the CoMet run (comet-ray audit {run}):", found, where]
    return lines
