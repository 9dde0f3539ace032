"""Settings are declared once: a train command's options are the configuration's field names, and
`--set KEY=VALUE` reaches any setting, nested ones included, refused clearly when unknown."""
from __future__ import annotations

import pytest

from reidgen.cli import build_parser, main
from reidgen.cli.train import _overrides
from reidgen.core.config import parse_settings, setting_names, with_overrides
from reidgen.core.errors import ReidgenError
from trainer.tasks.crgan import CRGAN_TRAIN_PRESETS
from trainer.tasks.dgnet import DGNET_TRAIN_PRESETS
from trainer.tasks.reid import REID_PRESETS


def test_set_values_are_read_as_json_when_they_are():
    names = setting_names(DGNET_TRAIN_PRESETS["small"])
    got = parse_settings(["id_cross=1.0", "milestones=[0.5, 0.9]", "feed=false", "teacher=runs/t", "lr-gen=2e-4"],
                         names)
    assert got == {"id_cross": 1.0, "milestones": (0.5, 0.9), "feed": False, "teacher": "runs/t", "lr_gen": 2e-4}
    cfg = with_overrides(DGNET_TRAIN_PRESETS["small"], **got)
    assert cfg.weights.id_cross == 1.0 and cfg.milestones == (0.5, 0.9) and cfg.feed is False
    # Two levels down: the generator's fields inside the model's configuration.
    deep = with_overrides(DGNET_TRAIN_PRESETS["small"], **parse_settings(["adain_bands=true", "backbone=resnet50"],
                                                                         names))
    assert deep.model.generator.adain_bands is True and deep.model.backbone == "resnet50"
    assert deep.model.generator.image_size == DGNET_TRAIN_PRESETS["small"].model.generator.image_size


@pytest.mark.parametrize("pair, words", [("id_cros=1", "did you mean id_cross"), ("id_cross", "expected KEY=VALUE"),
                                         ("=3", "expected KEY=VALUE")])
def test_a_bad_set_is_one_clear_error(pair, words):
    with pytest.raises(ReidgenError, match=words):
        parse_settings([pair], setting_names(DGNET_TRAIN_PRESETS["small"]))


def test_options_and_set_reach_the_configuration():
    args = build_parser().parse_args(["train-dgnet", "--data", "d", "--teacher", "t", "--out", "o", "--adv", "2",
                                      "--milestones", "0.5", "--set", "id_cross=1.0", "--set", "gamma=0.5"])
    got = _overrides(args, DGNET_TRAIN_PRESETS["small"], handled=("data", "teacher"))
    assert got == {"adv": 2.0, "milestones": (0.5,), "id_cross": 1.0, "gamma": 0.5}
    args = build_parser().parse_args(["train-crgan", "--source", "s", "--target", "t", "--id-model", "m",
                                      "--out", "o", "--con-loss", "rms", "--set", "lambda_con=2"])
    assert _overrides(args, CRGAN_TRAIN_PRESETS["small"], handled=("source", "target", "id_model")) == {
        "con_loss": "rms", "lambda_con": 2}
    args = build_parser().parse_args(["train-reid", "--data", "d", "--out", "o", "--set", "bottleneck=256"])
    assert _overrides(args, REID_PRESETS["small"], handled=("data",)) == {"bottleneck": 256}


def test_an_unknown_setting_on_the_command_line_is_one_line_and_exit_2(market_mini, tmp_path, capsys):
    code = main(["train-dgnet", "--data", str(market_mini), "--teacher", "t.pt", "--out", str(tmp_path / "run"),
                 "--set", "lambda_idd=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no setting named 'lambda_idd'" in err[0]
    assert not (tmp_path / "run").exists()
