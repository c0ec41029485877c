"""comet_ray.resume: saved epoch state is used only by the same run, and survives a kill between writes."""

from __future__ import annotations

import json

import torch

from comet_ray.comet.trainer import EpochLog
from comet_ray.resume import EpochResume, run_fingerprint


def _log(epoch: int) -> EpochLog:
    return EpochLog(
        epoch=epoch,
        loss=1.0 / (epoch + 1),
        lam=0.1,
        det_sigma=0.0,
        fence=0.5,
        mean_weight=1.0,
        low_confidence=0,
        weight_histogram=[0] * 10,
        mean_weight_injected=None,
        mean_weight_nominal=None,
        meta_l_tr=None,
        meta_l_val=None,
        seconds=0.1,
    )


def test_fingerprint_follows_knobs_and_data_but_not_the_output_folder() -> None:
    config = {"seed": 0, "epochs": 4, "out": "runs/a"}
    base = run_fingerprint(config, ["a.png", "b.png"], {"backbone": "resnet18"})
    assert run_fingerprint({**config, "out": "runs/b"}, ["a.png", "b.png"], {"backbone": "resnet18"}) == base
    assert run_fingerprint({**config, "seed": 1}, ["a.png", "b.png"], {"backbone": "resnet18"}) != base
    assert run_fingerprint(config, ["a.png"], {"backbone": "resnet18"}) != base
    assert run_fingerprint(config, ["a.png", "b.png"], {"backbone": "mobilenet_v2"}) != base


def test_round_trip_and_other_runs_start_fresh(tmp_path) -> None:
    resume = EpochResume(tmp_path, "fp-1")
    assert resume.load() == (None, [])
    resume.save({"epoch": 2, "weights": torch.ones(3)}, [_log(0), _log(1)])
    state, logs = resume.load()
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.ones(3))
    assert [e.epoch for e in logs] == [0, 1] and logs[1].loss == 0.5
    assert EpochResume(tmp_path, "fp-2").load() == (None, [])  # another configuration or dataset
    resume.clear()
    assert not (tmp_path / ".resume").exists() and resume.load() == (None, [])


def test_a_kill_between_the_two_writes_drops_the_extra_log(tmp_path) -> None:
    resume = EpochResume(tmp_path, "fp")
    resume.save({"epoch": 1}, [_log(0)])
    history = tmp_path / ".resume" / "history.json"
    record = json.loads(history.read_text())
    record["epochs"].append(_log(1).to_dict())  # the log of epoch 1 landed, its state did not
    history.write_text(json.dumps(record))
    state, logs = resume.load()
    assert state["epoch"] == 1 and [e.epoch for e in logs] == [0]


def test_unreadable_state_starts_fresh(tmp_path) -> None:
    resume = EpochResume(tmp_path, "fp")
    resume.save({"epoch": 1}, [_log(0)])
    (tmp_path / ".resume" / "trainer_state.pt").write_bytes(b"cut off")
    assert resume.load() == (None, [])


def test_a_state_without_an_epoch_starts_fresh_with_one_warning(tmp_path, caplog) -> None:
    resume = EpochResume(tmp_path, "fp")
    resume.save({"weights": torch.ones(2)}, [_log(0)])  # malformed: no "epoch"
    with caplog.at_level("WARNING", logger="comet_ray.resume"):
        assert resume.load() == (None, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "starting from epoch 0" in warnings[0] and "\n" not in warnings[0]
