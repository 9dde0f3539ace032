"""The CUDA paths (issue 24), run by bench/gpu_check.py on a GPU and skipped without one: one
DG-Net paper-preset and one CR-GAN iteration in fp32, bf16 and fp16 autocast (fp16 with the
loop's GradScaler over every optimiser) with finite losses close to fp32's; checkpoints moving
between CUDA and the CPU; the engine's swap, render and out-of-memory splitting on CUDA."""
from __future__ import annotations

import pytest

from bench import gpu_check
from reidgen.core.checkpoint import run_checkpoint
from tests.cuda import needs_cuda


@pytest.fixture(scope="module")
def setup(market_mini, tmp_path_factory):
    return gpu_check.Setup(tmp_path_factory.mktemp("gpu"), market_mini, "cuda", dry=False)


@needs_cuda
@pytest.mark.parametrize("kind", ["dgnet", "crgan"])
def test_one_iteration_per_precision_is_finite_and_close_to_fp32(setup, kind, tmp_path):
    cfg = setup.dgnet_config() if kind == "dgnet" else setup.crgan_config()
    result = gpu_check.check_precisions(kind, cfg, tmp_path, warmup=0, iterations=1)
    assert result["runs"]["fp16"]["grad_scaler"] and not result["runs"]["bf16"]["grad_scaler"]
    for precision in gpu_check.PRECISIONS:
        assert result["losses_vs_fp32"][precision]["finite"], result
        assert result["losses_vs_fp32"][precision]["within_tolerance"], result


@needs_cuda
@pytest.mark.parametrize("kind", ["dgnet", "crgan"])
@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoints_move_between_cuda_and_the_cpu(setup, kind, first, second, tmp_path):
    make = setup.dgnet_config if kind == "dgnet" else setup.crgan_config
    assert gpu_check.check_resume(kind, make, tmp_path, first, second)["ok"]


@needs_cuda
def test_engine_swaps_renders_and_splits_on_out_of_memory(setup, tmp_path):
    dgnet = tmp_path / "dgnet"
    gpu_check.make_task("dgnet", setup.dgnet_config(), dgnet).run()
    crgan = tmp_path / "crgan"
    gpu_check.make_task("crgan", setup.crgan_config(), crgan).run()
    result = gpu_check.check_engine(setup, run_checkpoint(dgnet), run_checkpoint(crgan), simulate_oom=False)
    assert result["ok"], result
