"""Layout planning: every TP x PP x VPP x DP x micro-batch x recompute layout of a GPU budget,
with its predicted memory per rank (``memory_model``) and step time, or why it cannot run.

Step time is an analytic estimate, stated with its assumptions so that it can be checked against
sweeps (``tools/analyze_scaling.py``):

- compute: each pipeline stage's model FLOPs (``flops``; recomputation adds its forward again)
  at ``efficiency`` x the GPU's dense peak, divided over TP ranks; the slowest stage sets the pace;
- pipeline bubble: (PP - 1) / VPP micro-batch slots of that stage;
- tensor parallelism: 2 all-reduces of the activations per transformer layer in forward and 2
  in backward, ring cost 2 (TP - 1) / TP x bytes at the intra-node bandwidth, not overlapped;
- data parallelism: reduce-scatter (or all-reduce) of fp32 gradients and, with the distributed
  optimizer, all-gather of the weights, at the inter-node bandwidth when DP spans nodes, exposed
  to the extent ``dp_overlap`` says it is not hidden behind backward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from megatron_vlm.backbones import recipes_of
from megatron_vlm.config import ModelConfig, ParallelConfig, TrainableConfig
from megatron_vlm.distributed import layout_problems
from megatron_vlm.models.cross_attention import gated_block_forward_flops
from megatron_vlm.perf import flops
from megatron_vlm.perf.memory_model import (
    TrainingSetup,
    Workload,
    chunks_of_stage,
    decoder_layers_per_chunk,
    predict_memory,
)

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    efficiency: float = 0.5  # achieved / peak on the matmuls of a large layer
    intra_node_gbps: float = 450.0  # NVLink bandwidth per GPU, GB/s
    inter_node_gbps: float = 50.0  # InfiniBand per GPU (400 Gb/s), GB/s
    reserved_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    dp_overlap: float = 0.8  # share of gradient communication hidden behind backward


@dataclass(frozen=True)
class Job:
    """What is trained: the model, a global batch of sequences, and what each sequence holds."""

    model: ModelConfig
    global_batch_size: int  # sequences per optimizer step
    seq_length: int
    images_per_sequence: int
    patches_per_image: int
    params_dtype: str = "bfloat16"
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    kernels: str = "te"


@dataclass
class LayoutEstimate:
    parallel: ParallelConfig
    data_parallel: int
    micro_batch_size: int
    num_microbatches: int
    distributed_optimizer: bool
    problems: list[str]
    peak_memory_gib: float = 0.0  # the fullest pipeline stage
    step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        p = self.parallel
        vpp = f" VPP{p.virtual_pipeline}" if p.virtual_pipeline else ""
        return (
            f"TP{p.tensor_parallel} PP{p.pipeline_parallel}{vpp} DP{self.data_parallel} "
            f"mb{self.micro_batch_size}x{self.num_microbatches} recompute={p.recompute}"
            f"{' dist-opt' if self.distributed_optimizer else ''}"
        )


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def stage_forward_flops(job: Job, parallel: ParallelConfig, stage: int, micro_batch_size: int) -> float:
    """Model FLOPs of one micro-batch's forward through one pipeline stage (all its chunks)."""
    model, s = job.model, job.seq_length
    tokens = micro_batch_size * s
    attended = micro_batch_size * s * (s + 1) // 2  # causal over the packed sequence: an upper bound
    total = 0.0
    for chunk in chunks_of_stage(model, parallel, stage):
        total += chunk.decoder_layers * flops.decoder_layer_forward_flops(model, tokens, attended)
        if chunk.gated_blocks:  # a sequence's images are every token's context: an upper bound, as ``attended``
            context = job.images_per_sequence * recipes_of(model)[1].tokens_per_image(model)
            total += chunk.gated_blocks * gated_block_forward_flops(
                model, tokens, micro_batch_size * context, tokens * context
            )
        if chunk.vision:
            images = micro_batch_size * job.images_per_sequence
            total += images * flops.vision_forward_flops(model, job.patches_per_image)
        if chunk.output:
            total += flops.output_layer_forward_flops(model, tokens)
    return total


def estimate(job: Job, cluster: Cluster, candidate: LayoutEstimate) -> LayoutEstimate:
    """Fill in memory and speed of a candidate layout, or the reasons it cannot run."""
    parallel, tp, pp = candidate.parallel, candidate.parallel.tensor_parallel, candidate.parallel.pipeline_parallel
    problems = layout_problems(job.model, parallel, cluster.gpus)
    if tp > cluster.gpus_per_node:
        problems.append(f"TP={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): its all-reduces need NVLink")
    per_step = candidate.micro_batch_size * candidate.data_parallel
    if job.global_batch_size % per_step:
        problems.append(f"global batch {job.global_batch_size} is not a multiple of micro batch x DP = {per_step}")
    if parallel.virtual_pipeline and candidate.num_microbatches < pp:
        problems.append(
            f"the interleaved schedule needs at least PP={pp} micro-batches per step, not {candidate.num_microbatches}"
        )
    images = candidate.micro_batch_size * job.images_per_sequence
    workload = Workload(candidate.micro_batch_size, job.seq_length, images, job.patches_per_image)
    setup = TrainingSetup(
        parallel=parallel,
        data_parallel=candidate.data_parallel,
        num_microbatches=max(1, candidate.num_microbatches),
        params_dtype=job.params_dtype,
        distributed_optimizer=candidate.distributed_optimizer,
        trainable=job.trainable,
        kernels=job.kernels,
    )
    if problems:
        candidate.problems = problems
        return candidate
    stages = predict_memory(job.model, setup, workload)
    fullest = max(stages, key=lambda stage: stage.peak)
    candidate.peak_memory_gib = fullest.peak / GIB
    usable = cluster.gpu_memory_gib - cluster.reserved_gib
    if candidate.peak_memory_gib > usable:
        problems.append(
            f"needs {candidate.peak_memory_gib:.1f} GiB on stage {fullest.stage} > {usable:.1f} GiB usable "
            f"(weights {fullest.weights / GIB:.1f}, grads {fullest.gradients / GIB:.1f}, optimizer "
            f"{fullest.optimizer / GIB:.1f}, activations {fullest.activations / GIB:.1f} for "
            f"{fullest.microbatches_in_flight} micro-batches in flight)"
        )
        candidate.problems = problems
        return candidate

    # --- speed
    recompute_factor = {"none": 3.0, "selective": 3.1, "full": 4.0}[parallel.recompute]  # forward multiples
    achieved = cluster.peak_tflops * 1e12 * cluster.efficiency
    stage_seconds = [
        recompute_factor * stage_forward_flops(job, parallel, stage, candidate.micro_batch_size) / tp / achieved
        for stage in range(pp)
    ]
    slowest = max(stage_seconds)
    m = candidate.num_microbatches
    compute = m * slowest
    bubble = (pp - 1) / (parallel.virtual_pipeline or 1) * slowest
    element = 2 if job.params_dtype != "float32" else 4
    layers_per_stage = max(sum(chunks) for chunks in decoder_layers_per_chunk(job.model, parallel))
    activation_bytes = candidate.micro_batch_size * job.seq_length * job.model.text.hidden_size * element
    tensor_parallel = 0.0
    if tp > 1:
        all_reduce = 2 * (tp - 1) / tp * activation_bytes / (cluster.intra_node_gbps * 1e9)
        tensor_parallel = m * layers_per_stage * 4 * all_reduce
    gradient_bytes = max(stage.trainable_parameters for stage in stages) * 4
    data_parallel = 0.0
    dp = candidate.data_parallel
    if dp > 1:
        spans_nodes = tp * pp * dp > cluster.gpus_per_node
        bandwidth = (cluster.inter_node_gbps if spans_nodes else cluster.intra_node_gbps) * 1e9
        volume = 2 * (dp - 1) / dp * gradient_bytes
        if candidate.distributed_optimizer:
            volume += (dp - 1) / dp * max(stage.parameters for stage in stages) * element  # weight all-gather
        data_parallel = (1 - cluster.dp_overlap) * volume / bandwidth
    step = compute + bubble + tensor_parallel + data_parallel
    tokens = job.global_batch_size * job.seq_length
    model_flops = 3 * sum(stage_forward_flops(job, parallel, stage, 1) for stage in range(pp)) * job.global_batch_size
    candidate.step_seconds = step
    candidate.tokens_per_second = tokens / step
    candidate.mfu = model_flops / step / (cluster.gpus * cluster.peak_tflops * 1e12)
    candidate.breakdown = {
        "compute": compute,
        "bubble": bubble,
        "tensor_parallel": tensor_parallel,
        "data_parallel": data_parallel,
    }
    return candidate


def plan(
    job: Job,
    cluster: Cluster,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
    recompute: tuple[str, ...] = ("none", "selective", "full"),
    virtual_pipeline: tuple[int | None, ...] = (None, 2, 4),
) -> list[LayoutEstimate]:
    """Every layout of ``cluster.gpus`` GPUs: feasible ones first, fastest first."""
    estimates = []
    for tp, pp in itertools.product(_divisors(cluster.gpus), _divisors(cluster.gpus)):
        if cluster.gpus % (tp * pp):
            continue
        dp = cluster.gpus // (tp * pp)
        for vpp, mb, mode, dist_opt in itertools.product(
            virtual_pipeline, micro_batch_sizes, recompute, (True, False) if dp > 1 else (False,)
        ):
            if vpp and pp < 2:
                continue
            parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp, recompute=mode)
            microbatches = job.global_batch_size // (mb * dp) if job.global_batch_size >= mb * dp else 0
            candidate = LayoutEstimate(parallel, dp, mb, microbatches, dist_opt, problems=[])
            if microbatches == 0:
                candidate.problems = [f"global batch {job.global_batch_size} < micro batch {mb} x DP {dp}"]
            else:
                estimate(job, cluster, candidate)
            estimates.append(candidate)
    return sorted(estimates, key=lambda e: (not e.feasible, -e.tokens_per_second, e.peak_memory_gib))
