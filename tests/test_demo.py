"""The main job end to end on real images (tiny settings), its report, and its error for missing data."""
from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import pytest

from api_schemas.evaluation import EvaluationReport
from reidgen.cli import main
from reidgen.core.config import config_from_dict
from reidgen.core.errors import ReidgenError
from reidgen.core.market import link_subset
from trainer.demo import DemoConfig, _finetune, demo_checkpoints, run_demo
from trainer.tasks.reid import ReidTrainConfig


@pytest.fixture(scope="module")
def demo_run(market_mini, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = link_subset(market_mini, root / "data", ids=10)
    out = root / "run"
    report = run_demo(DemoConfig(data=str(data), out=str(out), epochs=1, dgnet_iterations=4, records=32,
                                 shard_size=16, workers=0, device="cpu", quality_images=16))
    return out, report


def test_demo_runs_every_stage_and_writes_a_self_contained_report(demo_run):
    out, report = demo_run
    html = report.read_text()
    # Every picture is embedded (no file references), and each is a real PNG.
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) >= 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in sources)
    # The result table has a row per model, with the figures of their eval.json.
    for name in ("teacher", "dgnet", "real_only", "real_plus_synthetic"):
        r = EvaluationReport.model_validate_json((out / "eval" / f"{name}.json").read_text())
        assert f"{100 * r.rank1:.2f}" in html and f"{100 * r.mAP:.2f}" in html
    # The generation-quality table (reidgen quality's figures) and the curve logged during training.
    quality = json.loads((out / "quality.json").read_text())
    assert "identity_consistency" in html and f"{quality['reconstruction_ssim']:.4f}" in html
    assert f"{quality['identity_consistency_judge']:.4f}" in html and quality["judge"].startswith(str(out / "judge"))
    assert "cheap quality figures during training" in html
    assert set(demo_checkpoints(out)) == {"teacher", "dgnet", "real_only", "real_plus_synthetic"}
    # Both fine-tunes start from the teacher; only the second reads the shards.
    for name, shards in (("real_only", []), ("real_plus_synthetic", [str((out / "shards").resolve())])):
        config = json.loads((out / name / "config.json").read_text())
        assert config["init"] == str(out / "teacher" / "checkpoints" / "last.pt") and config["shards"] == shards
    # Without Inception: the FID and KID rows say so, and how to add them.
    assert quality["fid"] is None and quality["fid_real"] is None and "not measured" in html and "--n 16" in html
    assert "32 records (planned 32)" in html  # the shard job's verify summary


def test_demo_reuses_finished_stages(demo_run):
    out, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    data = out.parent / "data"
    run_demo(DemoConfig(data=str(data), out=str(out), epochs=1, dgnet_iterations=4, records=32, shard_size=16,
                        workers=0, device="cpu", quality_images=16))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == before


def test_demo_refuses_a_finetune_folder_of_another_recipe(demo_run):
    out, _ = demo_run
    trained = config_from_dict(ReidTrainConfig, json.loads((out / "real_only" / "config.json").read_text()))
    assert _finetune(trained, str(out / "real_only")) == out / "real_only" / "checkpoints" / "last.pt"  # reused
    with pytest.raises(ReidgenError, match="another recipe"):
        _finetune(replace(trained, init="", epochs=4), str(out / "real_only"))


def test_demo_without_data_says_what_to_do(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reidgen: error:") and "nowhere" in err and "REIDGEN_DATA" in err


def test_demo_reuses_a_longer_dgnet_run_and_refuses_one_of_other_data(demo_run, market_mini, tmp_path):
    out, _ = demo_run
    data = out.parent / "data"
    again = tmp_path / "again"
    run_demo(DemoConfig(data=str(data), out=str(again), epochs=1, records=32, shard_size=16, workers=0,
                        device="cpu", quality_images=16, dgnet=str(out / "dgnet")))
    assert not (again / "dgnet").exists() and not (again / "teacher").exists()  # reused, not trained
    assert json.loads((again / "quality.json").read_text())["checkpoint"].startswith(str(out / "dgnet"))
    with pytest.raises(ReidgenError, match="was trained on"):
        run_demo(DemoConfig(data=str(market_mini), out=str(tmp_path / "other"), dgnet=str(out / "dgnet")))
