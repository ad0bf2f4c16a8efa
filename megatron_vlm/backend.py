"""Capability checks (CUDA, Transformer Engine, DALI, apex) and the CPU patches for Megatron-Core.

Megatron-Core assumes a CUDA device in a handful of places. On a host without CUDA (laptops, CI)
the CPU *is* the device, and each patch below redirects one such assumption to the CPU. Every patch
is named, says why it exists and which Megatron-Core versions need it (a PEP 440 range, checked
against the installed version), and is applied only when ``torch.cuda.is_available()`` is false.
``apply_cpu_patches()`` is idempotent and returns the names of the patches in force.

Supported Megatron-Core: ``SUPPORTED_MEGATRON_CORE`` (tested on 0.16.1 and 0.19.2).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Capability checks
# --------------------------------------------------------------------------------------------


@functools.cache
def has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def imports(module: str) -> bool:
    """Whether ``module`` imports here (not a capability check: TE's wheel may import nowhere else)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure (missing CUDA libs too) means "absent"
        return False
    return True


def has_transformer_engine() -> bool:
    """TE needs a GPU: its import fails on CPU hosts even when the wheel is installed."""
    return has_cuda() and imports("transformer_engine.pytorch")


def has_apex() -> bool:
    return has_cuda() and imports("apex")


def has_dali() -> bool:
    """DALI imports without a GPU (CPU pipelines run with ``device_id=None``)."""
    return imports("nvidia.dali")


def has_fp8() -> bool:
    """FP8 training needs TE and a Hopper-or-newer GPU (compute capability >= 8.9)."""
    return has_transformer_engine() and torch.cuda.get_device_capability() >= (8, 9)


def has_fused_softmax() -> bool:
    """Megatron's fused masked-softmax kernels (a separately built CUDA extension)."""
    return has_cuda() and imports("scaled_masked_softmax_cuda")


def fp8_backend(requested: str) -> str:
    """Which FP8 implementation runs: "te" (Transformer Engine) or "torch" (``torch._scaled_mm``)."""
    if requested not in ("auto", "te", "torch"):
        raise ValueError(f"fp8_backend={requested!r}: use auto, te or torch")
    if requested == "te" and not has_fp8():
        raise RuntimeError("fp8_backend='te' needs Transformer Engine on an FP8-capable GPU (compute >= 8.9)")
    if requested == "torch" and has_cuda() and torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("FP8 GEMMs need a GPU of compute capability >= 8.9 (Ada, Hopper or newer)")
    if requested == "auto":
        return "te" if has_fp8() else "torch"
    return requested


def default_distributed_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


# --------------------------------------------------------------------------------------------
# CPU patches for Megatron-Core
# --------------------------------------------------------------------------------------------


SUPPORTED_MEGATRON_CORE = ">=0.16.1,<0.20"


@functools.cache
def megatron_core_version() -> Version:
    return Version(importlib.metadata.version("megatron-core"))


def check_megatron_core_version() -> None:
    """Refuse a Megatron-Core outside the tested range by name (its CPU patches and the code paths
    chosen per version are known only inside it)."""
    version = megatron_core_version()
    if version not in SpecifierSet(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron-core {version} is not supported: this version of megatron-vlm needs megatron-core "
            f"{SUPPORTED_MEGATRON_CORE} (tested on 0.16.1 and 0.19.2)"
        )


@dataclass(frozen=True)
class CpuPatch:
    name: str
    why: str
    apply: Callable[[], None]
    versions: str = SUPPORTED_MEGATRON_CORE  # the Megatron-Core versions that need it

    def needed(self, version: Version | None = None) -> bool:
        return (version or megatron_core_version()) in SpecifierSet(self.versions)


_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like")


def _cpu_device(device: object) -> object:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _TorchWithCpuDevice(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module: factories asked for 'cuda' get 'cpu'."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> object:
        attribute = getattr(torch, name)
        if name not in _TENSOR_FACTORIES:
            return attribute

        @functools.wraps(attribute)
        def factory(*args: object, **kwargs: object) -> object:
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return attribute(*args, **kwargs)

        return factory


# Megatron modules that build tensors with a literal device='cuda' on paths that CPU runs take.
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.transformer.utils",  # default causal / sliding-window masks
    "megatron.core.pipeline_parallel.schedules",  # token counters
    "megatron.core.optimizer.clip_grads",  # grad norm buffers
    "megatron.core.optimizer.optimizer",  # found_inf, scale buffers
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",  # broadcast_data size buffers
    "megatron.core.utils",  # local multi-tensor L2 norm fallback (no apex/TE)
)


def _patch_cuda_tensor_factories() -> None:
    shim = _TorchWithCpuDevice()
    for name in _MODULES_WITH_CUDA_FACTORIES:
        importlib.import_module(name).torch = shim


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # The tracker warns when the CPU generator moves inside a fork; here that is the point.
    logging.getLogger(megatron_random.__name__).setLevel(logging.ERROR)


class _CpuStream:
    """What Megatron asks of ``torch.cuda.current_stream()`` on the paths CPU runs: waiting on
    events and streams, which CPU execution (synchronous, one stream) has nothing to wait for."""

    def wait_event(self, event: object) -> None:
        pass

    def wait_stream(self, stream: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_current_stream() -> None:
    stream = _CpuStream()
    torch.cuda.current_stream = lambda device=None: stream


def _patch_optimizer_type_checks() -> None:
    original_type = torch.Tensor.type

    def tensor_type(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        result = original_type(self, *args, **kwargs)
        if args or kwargs or not isinstance(result, str) or not result.startswith("torch."):
            return result
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core.optimizer") and ".cuda." not in result:
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    torch.Tensor.type = tensor_type


CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        "current_device_is_cpu",
        "tensor-parallel layers, mappings and p2p allocate on torch.cuda.current_device(); "
        "it returns 'cpu' so those buffers live on the CPU.",
        _patch_current_device,
    ),
    CpuPatch(
        "rng_tracker_on_cpu_generator",
        "model_parallel_cuda_manual_seed and the RNG tracker save/restore CUDA generator states; "
        "they act on the CPU generator, so forked regions (TP-local init, dropout) stay "
        "reproducible per tensor-parallel rank.",
        _patch_rng,
    ),
    CpuPatch(
        "cuda_tensor_factories_on_cpu",
        "causal masks, token counters, grad-norm and loss-scale buffers are created with "
        "device='cuda'; inside those modules torch factories map 'cuda' to 'cpu'.",
        _patch_cuda_tensor_factories,
    ),
    CpuPatch(
        "synchronize_is_noop",
        "p2p communication and parallel_state call torch.cuda.synchronize(); CPU ops are synchronous.",
        _patch_synchronize,
    ),
    CpuPatch(
        "optimizer_sees_cuda_tensor_types",
        "the optimizers accept fp32 params only if tensor.type() == 'torch.cuda.FloatTensor'; "
        "for calls from megatron.core.optimizer, CPU tensors report the matching cuda type name.",
        _patch_optimizer_type_checks,
    ),
    CpuPatch(
        "current_stream_is_a_cpu_stream",
        "from 0.19, every gradient reduction (start_grad_sync) first makes torch.cuda.current_stream() "
        "wait on CUDA-graph events; on CPU the stream is a stand-in with nothing to wait for.",
        _patch_current_stream,
        versions=">=0.19",
    ),
)

_applied: list[str] = []


def apply_cpu_patches() -> list[str]:
    """Apply, once, every CPU patch this Megatron-Core version needs when CUDA is absent; returns
    the names in force."""
    check_megatron_core_version()
    if has_cuda() or _applied:
        return list(_applied)
    for patch in CPU_PATCHES:
        if not patch.needed():
            continue
        patch.apply()
        _applied.append(patch.name)
        logger.debug("megatron-core CPU patch applied: %s (%s)", patch.name, patch.why)
    return list(_applied)
