"""The GPU path's plumbing, checked on the CPU (issue 24, item 2): the autocast dtype chosen per
device, the loop's GradScaler step over several optimisers (a real, enabled CPU scaler and a
recording fake), and `TrainLoop.prepare` leaving the CPU's numbers alone while making a CUDA
optimiser state usable on the CPU. What needs a GPU is marked ``cuda`` (bench/gpu_check.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from reidgen.core import device
from reidgen.core.device import amp_dtype, autocast
from reidgen.core.errors import ReidgenError
from tests.cuda import needs_cuda
from trainer.loop import Task, TrainLoop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_amp_dtype_per_device(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype(CPU, True) is None and amp_dtype(CPU, True, cpu=True) == torch.bfloat16
    assert amp_dtype(CPU, True, cpu=True, precision="fp32") is None
    assert amp_dtype(CPU, True, cpu=True, precision="fp16") is None
    assert amp_dtype(CPU, True, precision="bf16") == torch.bfloat16
    assert amp_dtype(CUDA, False) is None and amp_dtype(CUDA, True, precision="fp32") is None
    assert amp_dtype(CUDA, True, precision="fp16") == torch.float16
    assert amp_dtype(CUDA, True, precision="bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(CUDA, True) == torch.float16  # e.g. a V100 or T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(CUDA, True) == torch.bfloat16
    with pytest.raises(ReidgenError, match="precision"):
        amp_dtype(CPU, True, precision="fp8")
    x = torch.randn(2, 2)
    with autocast(CPU, True):  # the CPU in fp32 unless cpu_bf16 asks for more, as before
        assert (x @ x).dtype == torch.float32
    with autocast(CPU, True, cpu=True):
        assert (x @ x).dtype == torch.bfloat16
    # Without native bf16 a preset's bf16 default stays fp32 (emulated bf16 is slower); forced, it holds.
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert amp_dtype(CPU, True, cpu=True) is None
    assert amp_dtype(CPU, True, cpu=True, precision="bf16") == torch.bfloat16


def test_loop_precision_on_the_cpu_has_no_scaler(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    loop = TrainLoop("reid", tmp_path, progress=False)
    assert loop.pick_device("cpu", amp=True) == CPU
    assert loop.amp_dtype is None and loop.scaler is None
    loop.set_precision("fp16")  # fp16 autocast is a CUDA mode: the CPU stays in fp32
    assert loop.amp_dtype is None and loop.scaler is None
    loop.pick_device("cpu", amp=True, cpu_bf16=True)
    assert loop.amp_dtype is None  # the forced fp16 holds until set back
    loop.set_precision("bf16")
    assert loop.amp_dtype == torch.bfloat16 and loop.scaler is None
    loop.set_precision("auto")
    assert loop.amp_dtype == torch.bfloat16 and loop.scaler is None


def _two_nets():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    return a, b, torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)


def _loss(a, b, scale=1.0):
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    return b(a(x)).pow(2).mean() * scale


def _params(*nets):
    return [p.detach().clone() for n in nets for p in n.parameters()]


def test_scaler_steps_every_optimiser_and_matches_the_unscaled_step(tmp_path):
    plain = TrainLoop("reid", tmp_path / "a", progress=False)
    a, b, oa, ob = _two_nets()
    for _ in range(3):
        plain.update(_loss(a, b), oa, ob)
    expected = _params(a, b)

    scaled = TrainLoop("reid", tmp_path / "b", progress=False)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)  # a real, enabled scaler (powers of 2)
    a, b, oa, ob = _two_nets()
    for _ in range(3):
        scaled.update(_loss(a, b), oa, ob)
    for got, want in zip(_params(a, b), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    # A non-finite gradient: neither optimiser steps, and the scale halves, once.
    before, scale = _params(a, b), scaled.scaler.get_scale()
    scaled.update(_loss(a, b, scale=float("inf")), oa, ob)
    assert all(torch.equal(x, y) for x, y in zip(_params(a, b), before))
    assert scaled.scaler.get_scale() == scale / 2


class RecordingScaler:
    """The GradScaler interface, recording the calls (no scaling)."""

    def __init__(self):
        self.calls = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss

    def step(self, opt):
        self.calls.append(("step", type(opt).__name__))
        opt.step()

    def update(self):
        self.calls.append("update")


def test_update_calls_the_scaler_once_per_optimiser_and_updates_once(tmp_path):
    loop = TrainLoop("reid", tmp_path, progress=False)
    loop.scaler = RecordingScaler()
    a, b, oa, ob = _two_nets()
    loop.update(_loss(a, b), oa, ob)
    assert loop.scaler.calls == ["scale", ("step", "Adam"), ("step", "SGD"), "update"]
    idle = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # nothing of the loss: no gradients
    loop.scaler.calls.clear()
    loop.update(_loss(a, b), oa, idle)
    assert loop.scaler.calls == ["scale", ("step", "Adam"), "update"]


class _Tiny(Task):
    def __init__(self, loop):
        torch.manual_seed(0)
        self.loop, self.cfg = loop, None
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
        self.conv(torch.zeros(1, 3, 6, 6))
        self.models = {"net": self.conv}
        self.optimizers = {"opt": torch.optim.Adam(self.conv.parameters(), lr=0.01)}

    def step_once(self):
        self.loop.update(self.conv(torch.ones(2, 3, 6, 6)).mean(), self.optimizers["opt"])


def test_prepare_changes_nothing_on_the_cpu_and_unfuses_a_cuda_state(tmp_path):
    loop = TrainLoop("reid", tmp_path, progress=False)
    loop.pick_device("cpu", amp=True)
    reference, task = _Tiny(loop), _Tiny(loop)
    loop.prepare(task)
    for _ in range(2):
        reference.step_once()
        task.step_once()
    assert all(torch.equal(x, y) for x, y in zip(_params(reference.conv), _params(task.conv)))
    assert all(p.is_contiguous() for p in task.conv.parameters())  # channels_last is for CUDA only
    assert task.optimizers["opt"].param_groups[0]["fused"] is None

    # A state as a CUDA run saves it (fused, steps as float32 device tensors, channels_last
    # moments) resumes on the CPU and steps exactly as the plain state does.
    saved = copy.deepcopy(task.optimizers["opt"].state_dict())
    for group in saved["param_groups"]:
        group["fused"] = True
    for state in saved["state"].values():
        state["exp_avg"] = state["exp_avg"].contiguous(memory_format=torch.channels_last) \
            if state["exp_avg"].dim() == 4 else state["exp_avg"]
    task.optimizers["opt"].load_state_dict(saved)
    loop.prepare(task)
    group = task.optimizers["opt"].param_groups[0]
    assert group["fused"] is None
    for p in group["params"]:
        assert task.optimizers["opt"].state[p]["exp_avg"].stride() == p.stride()
    reference.step_once()
    task.step_once()
    assert all(torch.equal(x, y) for x, y in zip(_params(reference.conv), _params(task.conv)))


def test_a_task_measured_faster_in_channels_last_gets_it_on_the_cpu(tmp_path):
    loop = TrainLoop("dgnet", tmp_path, progress=False)
    loop.pick_device("cpu", amp=False)
    reference, task = _Tiny(loop), _Tiny(loop)
    task.channels_last_on_cpu = True
    task.frozen = torch.nn.Conv2d(3, 3, 3)  # not trained, an attribute (as a frozen feature network)
    loop.prepare(task)
    assert task.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert task.frozen.weight.is_contiguous(memory_format=torch.channels_last)
    assert reference.conv[0].weight.is_contiguous()
    for _ in range(2):
        reference.step_once()
        task.step_once()
    # The same training, up to the rounding of another convolution algorithm.
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_params(reference.conv), _params(task.conv)))


@needs_cuda
def test_prepare_on_cuda_fuses_adam_and_uses_channels_last(tmp_path):
    loop = TrainLoop("reid", tmp_path, progress=False)
    loop.pick_device("cuda", amp=True)
    task = _Tiny(loop)
    task.conv.cuda()
    task.optimizers = {"opt": torch.optim.Adam(task.conv.parameters(), lr=0.01)}
    loop.prepare(task)
    assert torch.backends.cudnn.benchmark
    assert task.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert task.optimizers["opt"].param_groups[0]["fused"] is True
    x = torch.ones(2, 3, 6, 6, device="cuda")
    with loop.autocast():
        loss = task.conv(x).mean()
    loop.update(loss, task.optimizers["opt"])
    state = task.optimizers["opt"].state[task.conv[0].weight]
    assert state["step"].is_cuda and state["exp_avg"].stride() == task.conv[0].weight.stride()
