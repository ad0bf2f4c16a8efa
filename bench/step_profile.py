"""Where one training step's time goes: a per-part breakdown from the torch profiler.

The model files stay as they are: forward hooks (and wrappers around the optimizer's methods) open
``record_function`` ranges around the model's parts while the profiler runs, and are removed after.
Each profiled operator is attributed to the innermost range it ran in; a backward operator (which
runs outside any forward range, on the autograd engine's thread) to the range of the forward
operator that made its autograd node (the profiler's sequence numbers link the two). Collectives
(NCCL / gloo) count as communication and host<->device copies as data movement, whatever range they
ran in.

Time basis: on a GPU, CUDA time (the device time of the kernels, copies and memsets each operator
launched); on CPU, the CPU self time of the operators on the training thread. So a part is what the
device (or CPU) spent on it; the device's idle time within the step is reported beside the parts.

Host syncs: on a GPU the CUDA runtime's synchronising calls within the step (stream / device /
event synchronize, blocking memcpy), each with the operator that made it; on CPU, where nothing
waits, the operators that would sync on a GPU: ``aten::_local_scalar_dense`` (``.item()``,
``float(t)``, ``bool(t)``) and operators whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function

SCOPE = "vlm_bench::"  # the prefix of the ranges opened here
STEP_RANGE = SCOPE + "step"
# The named parts, in report order ("other": operators in none of the ranges, e.g. the loss mask).
PARTS = (
    "vision",
    "connector",
    "embedding",
    "decoder.attention",
    "decoder.mlp",
    "decoder.norms",
    "decoder.other",
    "output_loss",
    "grad_accumulation",
    "optimizer",
    "communication",
    "data_movement",
    "other",
)
PART_NOTES = {
    "vision": "vision encoder (patch embedding, transformer layers, final norm)",
    "connector": "connector (projection, resampler)",
    "embedding": "token embeddings and the splice of image tokens into them",
    "decoder.attention": "decoder self-attention (QKV, RoPE, core attention, output projection)",
    "decoder.mlp": "decoder MLP (SwiGLU)",
    "decoder.norms": "decoder norms",
    "decoder.other": "decoder, the rest (residual adds, rotary tables)",
    "output_loss": "output layer, padded-vocabulary mask and cross entropy",
    "grad_accumulation": "DDP's per-micro-batch add of each gradient into its fp32 main_grad",
    "optimizer": "gradient finalisation, finite check, zeroing, the optimizer step",
    "communication": "NCCL / gloo collectives",
    "data_movement": "host<->device copies",
    "other": "everything else (schedule, loss reduction, launches outside the ranges)",
}
_COMMUNICATION = re.compile(r"^(nccl|gloo|c10d::|record_param_comms|ncclDevKernel|ncclKernel)", re.IGNORECASE)
_HOST_DEVICE_COPY = re.compile(r"^Memcpy (HtoD|DtoH)")
_BACKWARD = "autograd::engine::evaluate_function: "
# Blocking runtime calls (CUPTI may add a version or per-thread-stream suffix: cudaMemcpy_v3020 / _ptds);
# cudaMemcpyAsync is not one: a .item() shows as that copy and then a cudaStreamSynchronize.
_CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_CUDA_SYNC = re.compile(r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!\w*Async))")
_CPU_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique")


# -- ranges around the model's parts ---------------------------------------------------------


class _Ranges:
    """record_function ranges opened and closed by hooks, a stack per part: several modules map to
    one part (a decoder's norms), and one may run inside another of the same part."""

    def __init__(self) -> None:
        self.open: dict[str, list[record_function]] = {}

    def enter(self, part: str) -> None:
        scope = record_function(SCOPE + part)
        scope.__enter__()
        self.open.setdefault(part, []).append(scope)

    def exit(self, part: str) -> None:
        if self.open.get(part):
            self.open[part].pop().__exit__(None, None, None)


def _around(ranges: _Ranges, module: torch.nn.Module, part: str) -> list[Any]:
    return [
        module.register_forward_pre_hook(lambda *_: ranges.enter(part)),
        module.register_forward_hook(lambda *_: ranges.exit(part)),
    ]


def _wrap(owner: Any, name: str, part: str, ranges: _Ranges) -> Callable[[], None]:
    """Replace ``owner.name`` (a method or function attribute) with one inside the part's range."""
    original = getattr(owner, name)

    def scoped(*args: Any, **kwargs: Any) -> Any:
        ranges.enter(part)
        try:
            return original(*args, **kwargs)
        finally:
            ranges.exit(part)

    own = name in vars(owner)  # else a method of its class: the instance attribute only shadows it
    setattr(owner, name, scoped)

    def undo() -> None:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    return undo


def _is_identity(module: torch.nn.Module | None) -> bool:
    return module is None or type(module).__name__ in ("IdentityOp", "IdentityFuncOp")


@contextmanager
def part_ranges(chunks: Sequence[torch.nn.Module], model: Sequence[Any], optimizer: Any) -> Iterator[list[str]]:
    """Open a range around each part of the model ``chunks`` (the unwrapped modules), the DDP
    wrappers' and the optimizer's gradient work while inside; yields the parts found."""
    from megatron_vlm.training import step as step_module

    ranges = _Ranges()
    handles: list[Any] = []
    undo: list[Callable[[], None]] = []
    found: set[str] = set()
    for chunk in chunks:
        for part in ("vision", "connector"):
            module = getattr(chunk, part, None)
            if module is not None:
                handles += _around(ranges, module, part)
                found.add(part)
        language = chunk.language_model
        if getattr(language, "embedding", None) is not None:
            handles += _around(ranges, language.embedding, "embedding")
            found.add("embedding")
        if hasattr(chunk, "splice_images"):
            undo.append(_wrap(chunk, "splice_images", "embedding", ranges))
        decoder = language.decoder
        handles += _around(ranges, decoder, "decoder.other")
        found.add("decoder.other")
        for layer in decoder.layers:
            for name, module in layer.named_children():
                if _is_identity(module):
                    continue
                if name.endswith("attention"):
                    part = "decoder.attention"
                elif name == "mlp":
                    part = "decoder.mlp"
                elif name.endswith("norm"):
                    part = "decoder.norms"
                else:
                    continue
                handles += _around(ranges, module, part)
                found.add(part)
        if not _is_identity(getattr(decoder, "final_layernorm", None)):
            handles += _around(ranges, decoder.final_layernorm, "decoder.norms")
        output_layer = getattr(language, "output_layer", None)
        if output_layer is not None and getattr(chunk, "post_process", False):
            # From the output layer to the end of the model's forward: logits, vocabulary mask, loss.
            handles.append(output_layer.register_forward_pre_hook(lambda *_: ranges.enter("output_loss")))
            handles.append(chunk.register_forward_hook(lambda *_: ranges.exit("output_loss")))
            found.add("output_loss")
    for wrapper in model:
        undo.append(_wrap(wrapper, "zero_grad_buffer", "optimizer", ranges))
    config = model[0].config
    if getattr(config, "finalize_model_grads_func", None) is not None:
        undo.append(_wrap(config, "finalize_model_grads_func", "optimizer", ranges))
    if hasattr(step_module, "gradients_are_finite"):  # the step's finite check, called by name
        undo.append(_wrap(step_module, "gradients_are_finite", "optimizer", ranges))
    undo += [_wrap(optimizer, "step", "optimizer", ranges), _wrap(optimizer, "zero_grad", "optimizer", ranges)]
    found.update(("optimizer", "grad_accumulation"))
    try:
        yield sorted(found, key=PARTS.index)
    finally:
        for handle in handles:
            handle.remove()
        for restore in reversed(undo):
            restore()


# -- profiling and attribution ---------------------------------------------------------------


def profile_steps(
    run_step: Callable[[], Any],
    steps: int,
    chunks: Sequence[torch.nn.Module],
    model: Sequence[Any],
    optimizer: Any,
    device: str,
) -> dict[str, Any]:
    """Run ``steps`` steps (``run_step()``) under the profiler with the parts' ranges; returns the
    breakdown (seconds per step, averaged over the steps)."""
    if steps < 1:
        raise ValueError(f"profile {steps} steps: give at least 1")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with part_ranges(chunks, model, optimizer) as found:
        with torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False) as profiler:
            for _ in range(steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with record_function(STEP_RANGE):
                    run_step()
                if device == "cuda":
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
    parse_start = time.perf_counter()
    events = list(profiler.events())
    breakdown = attribute(events, device, steps, sum(walls) / steps)
    breakdown["ranges"] = found
    breakdown["analysis_seconds"] = time.perf_counter() - parse_start
    return breakdown


def _is_device(event: Any) -> bool:
    return event.device_type != DeviceType.CPU


class _Attribution:
    """The part of each CPU event: innermost range, or for backward the forward's."""

    def __init__(self, events: Sequence[Any]) -> None:
        self.cache: dict[int, str | None] = {}
        self.forward: dict[tuple[int, int], tuple[float, str]] = {}  # (thread, sequence nr) -> (start, part)
        self.forward_by_sequence: dict[int, set[str]] = {}
        for event in events:
            if _is_device(event) or event.sequence_nr < 0 or self._backward_root(event) is not None:
                continue
            part = self._forward_part(event)
            key = (event.thread, event.sequence_nr)
            start = event.time_range.start
            # Several operators share a sequence number (the next node's); the innermost / last one
            # started makes the node.
            if key not in self.forward or start >= self.forward[key][0]:
                self.forward[key] = (start, part or "other")
        for (_, sequence), (_, part) in self.forward.items():
            self.forward_by_sequence.setdefault(sequence, set()).add(part)

    @staticmethod
    def _backward_root(event: Any) -> Any:
        while event is not None:
            if event.name.startswith(_BACKWARD):
                return event
            event = event.cpu_parent
        return None

    @staticmethod
    def _forward_part(event: Any) -> str | None:
        while event is not None:
            if event.name.startswith(SCOPE) and event.name != STEP_RANGE:
                return event.name[len(SCOPE) :]
            event = event.cpu_parent
        return None

    def part(self, event: Any) -> str:
        """The part a CPU event's own time (and its kernels') belongs to."""
        key = id(event)
        if key not in self.cache:
            self.cache[key] = self._part(event)
        return self.cache[key] or "other"

    def _part(self, event: Any) -> str | None:
        chain = []
        walk = event
        while walk is not None:
            if _COMMUNICATION.match(walk.name):
                return "communication"
            chain.append(walk)
            walk = walk.cpu_parent
        for walk in chain:  # innermost first
            if walk.name.startswith(SCOPE) and walk.name != STEP_RANGE:
                return walk.name[len(SCOPE) :]
            if walk.name.startswith(_BACKWARD):
                if "AccumulateGrad" in walk.name:
                    return "grad_accumulation"
                found = self.forward.get((walk.fwd_thread, walk.sequence_nr))
                if found is not None:
                    return found[1]
                parts = self.forward_by_sequence.get(walk.sequence_nr, set())
                return next(iter(parts)) if len(parts) == 1 else None
        return None


def _in_steps(event: Any, windows: Sequence[tuple[float, float]]) -> bool:
    start = event.time_range.start
    return any(low <= start <= high for low, high in windows)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def attribute(events: Sequence[Any], device: str, steps: int, wall_seconds: float) -> dict[str, Any]:
    """The breakdown of profiled ``events`` (``profiler.events()``) over ``steps`` steps that took
    ``wall_seconds`` each."""
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == STEP_RANGE and not _is_device(e)]
    if len(windows) != steps:
        raise RuntimeError(f"found {len(windows)} profiled step ranges, expected {steps}")
    attribution = _Attribution(events)
    parts = dict.fromkeys(PARTS, 0.0)  # microseconds over all steps
    cpu_events = [e for e in events if not _is_device(e)]
    main_threads = {e.thread for e in cpu_events if e.name == STEP_RANGE}
    result: dict[str, Any] = {"profiled_steps": steps, "seconds_per_step": wall_seconds}
    if device == "cuda":
        result["time_basis"] = "CUDA time of the kernels, copies and memsets each part launched"
        # A range (record_function) also shows on the GPU's timeline, under its CPU name: not work.
        ranges = {e.name for e in cpu_events}
        linked = 0.0
        for event in cpu_events:
            for kernel in event.kernels:
                name = kernel.name
                if name in ranges:
                    continue
                if _COMMUNICATION.match(name):
                    part = "communication"
                elif _HOST_DEVICE_COPY.match(name):
                    part = "data_movement"
                else:
                    part = attribution.part(event)
                parts[part] += kernel.duration
                linked += kernel.duration
        device_events = [
            e for e in events if _is_device(e) and not getattr(e, "is_user_annotation", False) and e.name not in ranges
        ]
        total = sum(e.time_range.end - e.time_range.start for e in device_events)
        parts["other"] += max(0.0, total - linked)  # device work no operator claimed
        busy = _union_length([(e.time_range.start, e.time_range.end) for e in device_events])
        result["device_busy_seconds"] = busy / 1e6 / steps
        result["device_idle_seconds"] = max(0.0, wall_seconds - busy / 1e6 / steps)
    else:
        result["time_basis"] = "CPU self time of the operators on the training thread"
        for event in cpu_events:
            if event.thread not in main_threads or not _in_steps(event, windows):
                continue
            parts[attribution.part(event)] += event.self_cpu_time_total
    result["parts"] = {name: value / 1e6 / steps for name, value in parts.items()}
    result["accounted_seconds"] = sum(result["parts"].values())
    result["host_syncs"] = host_syncs(cpu_events, attribution, device, steps, windows)
    return result


def _cause(event: Any, attribution: _Attribution) -> str:
    """The operator behind a sync (the nearest aten operator above a runtime call) and its part."""
    walk = event.cpu_parent
    while walk is not None and not walk.name.startswith("aten::"):
        walk = walk.cpu_parent
    operator = walk.name if walk is not None else event.name
    return f"{operator} in {attribution.part(walk if walk is not None else event)}"


def host_syncs(
    cpu_events: Sequence[Any],
    attribution: _Attribution,
    device: str,
    steps: int,
    windows: Sequence[tuple[float, float]],
) -> dict[str, Any]:
    if device == "cuda":
        method = "CUDA runtime calls that block the host: " + ", ".join(_CUDA_SYNCS)
        found = [e for e in cpu_events if _CUDA_SYNC.match(e.name) and _in_steps(e, windows)]
    else:
        method = (
            "CPU: operators that sync the host on a GPU (.item()/float()/bool() -> aten::_local_scalar_dense; "
            "data-dependent sizes: nonzero, masked_select, unique)"
        )
        found = []
        for event in cpu_events:
            if event.name not in _CPU_SYNCS or not _in_steps(event, windows):
                continue
            parent = event.cpu_parent  # count a nested one once (e.g. item -> _local_scalar_dense)
            while parent is not None and parent.name not in _CPU_SYNCS:
                parent = parent.cpu_parent
            if parent is None:
                found.append(event)
    causes = Counter(
        _cause(e, attribution) if device == "cuda" else f"{e.name} in {attribution.part(e)}" for e in found
    )
    return {
        "per_step": len(found) / steps,
        "method": method,
        "by_cause": {cause: count / steps for cause, count in causes.most_common()},
    }
