"""The CPU patches for Megatron-Core: each named, explained, effective, and absent with CUDA."""

import subprocess
import sys

import pytest
import torch

from megatron_vlm import backend


@pytest.fixture(scope="module")
def patched():
    return backend.apply_cpu_patches()


def test_every_patch_is_named_explained_and_applied_once(patched):
    names = [p.name for p in backend.CPU_PATCHES]
    assert len(set(names)) == len(names)
    assert all(len(p.why) > 40 for p in backend.CPU_PATCHES)
    needed = [p.name for p in backend.CPU_PATCHES if p.needed()]
    assert patched == needed
    assert backend.apply_cpu_patches() == needed  # idempotent


def test_patches_state_the_versions_they_apply_to():
    from packaging.version import Version

    stream = next(p for p in backend.CPU_PATCHES if p.name == "current_stream_is_a_cpu_stream")
    assert not stream.needed(Version("0.16.1")) and stream.needed(Version("0.19.2"))
    assert all(p.needed(Version("0.16.1")) for p in backend.CPU_PATCHES if p is not stream)


def test_unsupported_megatron_core_is_refused_by_name(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(backend, "megatron_core_version", lambda: Version("0.15.3"))
    with pytest.raises(
        RuntimeError, match=r"megatron-core 0.15.3 is not supported: .* needs megatron-core >=0.16.1,<0.20"
    ):
        backend.check_megatron_core_version()


def test_current_stream_waits_on_nothing_where_megatron_core_needs_it(patched):
    if "current_stream_is_a_cpu_stream" not in patched:
        pytest.skip(
            f"megatron-core {backend.megatron_core_version()} does not call torch.cuda.current_stream on CPU paths"
        )
    stream = torch.cuda.current_stream()
    assert stream.wait_event(object()) is None and stream.wait_stream(stream) is None


def test_current_device_is_cpu(patched):
    from megatron.core.tensor_parallel.utils import split_tensor_into_1d_equal_chunks  # noqa: F401

    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_default_causal_mask_is_built_on_cpu(patched):
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_cuda_tensor_factories_in_megatron_modules_land_on_cpu(patched):
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert clip_grads.torch.zeros(1, dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert torch.zeros(1).device.type == "cpu"  # torch itself is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_rng_tracker_forks_reproducibly_on_cpu(patched, megatron_single_process):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draws():
        model_parallel_cuda_manual_seed(123)
        outside_before = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        outside_after = torch.rand(3)
        return outside_before, inside, outside_after

    first, second = draws(), draws()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # The fork draws from the tracker's own stream and leaves the default stream where it was.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), first[0]) and torch.equal(torch.rand(3), first[2])
    assert not torch.equal(first[1], first[2])


def test_synchronize_is_a_noop(patched):
    assert torch.cuda.synchronize() is None


def test_optimizer_sees_cuda_type_names_and_nobody_else(patched):
    tensor = torch.zeros(2)
    seen_by_optimizer = {}
    exec(
        "result = tensor.type()", {"__name__": "megatron.core.optimizer.optimizer", "tensor": tensor}, seen_by_optimizer
    )
    assert seen_by_optimizer["result"] == "torch.cuda.FloatTensor"
    assert tensor.type() == "torch.FloatTensor"
    assert tensor.type(torch.float64).dtype == torch.float64


def test_no_patch_is_applied_when_cuda_is_present():
    script = (
        "import torch; from megatron_vlm import backend\n"
        "backend.has_cuda = lambda: True\n"
        "original = torch.cuda.current_device; original_type = torch.Tensor.type\n"
        "assert backend.apply_cpu_patches() == []\n"
        "assert torch.cuda.current_device is original\n"
        "assert torch.Tensor.type is original_type\n"
        "print('untouched')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "untouched" in done.stdout


def test_capabilities_on_this_host():
    assert backend.has_cuda() is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert not backend.has_transformer_engine() and not backend.has_apex() and not backend.has_fp8()
        assert backend.default_distributed_backend() == "gloo"
