"""Pretraining, top to bottom: environment -> data -> model -> steps -> checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_vlm import backend, distributed
from megatron_vlm.backbones.common import torch_dtype
from megatron_vlm.config import RunConfig, to_dict
from megatron_vlm.models.checkpoint_io import load_weights, newest_checkpoint
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.models.lora import apply_trainable
from megatron_vlm.models.neftune import noise_seed
from megatron_vlm.perf.flops import measured_matmul_tflops
from megatron_vlm.perf.memory import TrainingMemoryMeter
from megatron_vlm.training import checkpoint, preflight, run_lock
from megatron_vlm.training.async_save import AsyncCheckpointWriter
from megatron_vlm.training.benchmarks import TrainingBenchmarks, benchmark_line, consumed_so_far, scalars
from megatron_vlm.training.data_feed import DataFeed, run_data_config, run_loader
from megatron_vlm.training.evaluation import Evaluator, evaluations_left
from megatron_vlm.training.metrics import Metrics, log_line, logger, validation_line
from megatron_vlm.training.preemption import PreemptionHandler
from megatron_vlm.training.results import RunResults
from megatron_vlm.training.step import build_optimizer, parameters_gathered, train_step, wrap_ddp
from megatron_vlm.training.stragglers import StragglerMonitor, clock, injected_delay


def _placement(tensors: Any) -> str:
    """Where tensors live, e.g. ``cuda:0 (torch.bfloat16)``: the start-up log shows it."""
    places: dict[str, set[str]] = {}
    for tensor in tensors:
        places.setdefault(str(tensor.device), set()).add(str(tensor.dtype))
    return ", ".join(f"{device} ({', '.join(sorted(dtypes))})" for device, dtypes in sorted(places.items()))


# Written into the run directory by a rank that exits because a peer stopped answering:
# slurm/pretrain_idefics2.sh then requeues the job.
PEER_LOST_FILE = "peer_lost.json"


# What a logging window sums on each data-parallel rank (then over them): real tokens, images, model
# FLOPs, decoder positions computed, real patches, vision positions computed.
WINDOW_SUMS = ("tokens", "images", "flops", "positions", "patches", "vision_positions")


def new_window() -> dict[str, float]:
    return {**dict.fromkeys(WINDOW_SUMS, 0.0), "steps": 0}


def pretrain(run: RunConfig) -> dict[str, Any]:
    with contextlib.ExitStack() as cleanup:  # on every way out: the end, preemption, an error
        return _pretrain(run, cleanup)


def _pretrain(run: RunConfig, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    training = run.training
    # Start-up stages are logged as they begin, so a run that stalls shows where (with the stacks
    # that SIGUSR2 prints, see megatron_vlm/train.py).
    env = distributed.agree_rendezvous(distributed.detect_environment())
    if env.rank == 0:
        logger.info(
            "%s; initializing torch.distributed (%s) and Megatron's parallel state",
            env.describe(),
            backend.default_distributed_backend(),
        )
    # Every machine-dependent build decision judged (and every problem named) before anything starts.
    plan = preflight.check_run(run, env.world_size)
    # Start-up (lock, checkpoint checks and loading, the build) is long: it runs under the long timeout.
    env = distributed.initialize(
        run.parallel, run.model, seed=training.seed, timeout_s=training.checkpoint_timeout_s, env=env
    )
    micro_batches_per_step = preflight.check_batch_layout(run, env.world_size)
    if env.rank == 0:
        logger.info("start-up checks passed: %s", plan.describe())
    output = Path(training.output_dir)
    checkpoints = output / "checkpoints"
    lock = run_lock.acquire_collective(output)  # one job per run directory, else refuse naming the holder
    distributed.on_peer_lost(lock.release)  # exiting for a silent peer frees the directory for the requeue

    def peer_lost() -> None:  # what the batch script looks for to requeue (srun reports the killed peer's code)
        (output / PEER_LOST_FILE).write_text(json.dumps({"rank": env.rank, "exit_code": distributed.EXIT_PEER_LOST}))

    distributed.on_peer_lost(peer_lost)
    if env.rank == 0:  # will the checkpoint written on the time-limit signal fit before the limit?
        rate = training.checkpoint_write_gbps * 1e9 or checkpoint.measure_write_bandwidth(checkpoints)
        if rate is None:
            logger.warning("could not write a test file into %s: the save-time check is skipped", checkpoints)
        elif warning := preflight.checkpoint_time_warning(run, rate, measured=not training.checkpoint_write_gbps):
            logger.warning(warning)
    resume_from = checkpoint.latest_checkpoint(checkpoints)

    # --- data: this data-parallel rank's share of the mixture
    if env.rank == 0:
        logger.info("%d rank(s) up (%s launch); loading the tokenizer and the data", env.world_size, env.launcher)
    data_config = run_data_config(run)
    loader = run_loader(
        run,
        data_config,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        # One lane per micro-batch of the global batch: the stream does not depend on the DP size.
        lanes=training.global_batch_size // run.data.micro_batch_size,
    )

    reports = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    metrics = Metrics(output / "tensorboard" if reports else None, run.logging.wandb, run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluator = None
    if training.eval_interval > 0:
        # The fixed validation micro-batches are planned once (tokens only, no image decoding).
        evaluator = Evaluator(loader, training.eval_samples, device)
        if env.rank == 0:
            logger.info("validation every %d steps and at the end: %s", training.eval_interval, evaluator.describe())
        if not evaluator.sources and env.rank == 0:
            logger.warning(
                "eval_interval=%d but no source has a validation split: no evaluation (build one with "
                "tools/preprocess_data.py --validation-fraction, or name one with 'validation:' in the mixture)",
                training.eval_interval,
            )
        if not evaluator.sources:
            evaluator = None
    benchmarks = None
    if training.benchmarks.interval > 0:  # the task data read now (metadata; images when used)
        benchmarks = TrainingBenchmarks(run, data_config.image, output)
        if env.rank == 0:
            logger.info(
                "benchmarks every %d steps and at the end: %s", training.benchmarks.interval, benchmarks.describe()
            )
    memory = TrainingMemoryMeter()
    memory.start()  # the training state counts from here, as the memory model's does (results.json)

    # --- model: build, start weights, what trains, DDP, optimizer, schedule
    if env.rank == 0:
        logger.info("building the model")
    chunks = build_model_chunks(run.model, run.parallel, run.precision)
    if training.load_weights and resume_from is None:
        if env.rank == 0:
            logger.info("starting from the weights of %s", newest_checkpoint(training.load_weights))
        load_weights(chunks, training.load_weights, run.model)  # its LoRA adapters merged
    apply_trainable(chunks, run.trainable, seed=training.seed)
    for chunk in chunks:
        chunk.neftune_alpha = training.neftune_alpha
    if training.neftune_alpha > 0 and env.rank == 0:
        logger.info("NEFTune: noise of alpha %g on the text embeddings while training", training.neftune_alpha)
    model = wrap_ddp(
        chunks, training.distributed_optimizer, training.overlap_grad_reduce, training.overlap_param_gather
    )
    optimizer = build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=training.lr,
            min_lr=training.min_lr,
            weight_decay=training.weight_decay,
            adam_beta1=training.adam_beta1,
            adam_beta2=training.adam_beta2,
            adam_eps=training.adam_eps,
            clip_grad=training.clip_grad,
            bf16=run.precision.params_dtype == "bfloat16",
            params_dtype=torch_dtype(run.precision.params_dtype),
            use_distributed_optimizer=training.distributed_optimizer,
            # The optimizer leaves the all-gather of updated shards to the next forward's hooks.
            overlap_param_gather=training.overlap_param_gather,
        ),
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.warmup_steps,
        lr_decay_steps=training.train_steps,
        lr_decay_style=training.lr_decay,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_steps,
        wd_incr_style="constant",
    )

    # --- resume
    # Micro-batches made ahead in a thread (data.prefetch) by one rank per model-parallel group
    # (data.loading); its state_dict() is the stream's position after the steps trained.
    feed = DataFeed(loader, micro_batches_per_step, run.model, run.data.prefetch, run.data.loading, device=device)
    cleanup.callback(feed.close)  # the prefetch thread stops however the run ends
    iteration = 0
    if resume_from is not None:
        iteration, loader_state = checkpoint.load_training_checkpoint(
            resume_from, chunks, optimizer, scheduler, run.model, run.trainable, training.seed
        )
        feed.load_state_dict(loader_state)
        if env.rank == 0:
            logger.info("resumed from %s at step %d", resume_from, iteration)
    if benchmarks is not None:
        benchmarks.resume(iteration)  # the evaluations up to the checkpoint (none for a fresh run)

    preemption = PreemptionHandler()
    if env.rank == 0:
        logger.info("measuring the %s matmul peak", device)
    # The device's matmul peak, measured now; the best rank's figure (others may be disturbed).
    peak = torch.tensor(
        [measured_matmul_tflops(torch_dtype(run.precision.params_dtype), device)],
        device=distributed.collective_device(),
    )
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    peak_tflops = float(peak[0])
    results = RunResults(run, memory, peak_tflops, env.world_size, micro_batches_per_step)
    if env.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "run_config.json").write_text(json.dumps(to_dict(run), indent=2, default=str))
        logger.info(
            "training for %d steps on %d ranks: %d micro-batches of %d per step and data-parallel rank; "
            "matmul peak %.3f TFLOP/s per rank",
            training.train_steps,
            env.world_size,
            micro_batches_per_step,
            run.data.micro_batch_size,
            peak_tflops,
        )

    # --- steps
    skipped_steps, window_start, window = 0, time.perf_counter(), new_window()
    last: dict[str, float] = {}
    validation: dict[str, float] = {}
    first_step = iteration + 1
    # Checkpoints are written in the background (training.async_save) and published at a later step.
    writer = AsyncCheckpointWriter()

    def saved(path: Path) -> None:
        if env.rank == 0:
            logger.info("saved %s", path)

    trace = None
    if (
        run.data.trace
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    ):
        (output / "data_trace").mkdir(parents=True, exist_ok=True)
        trace = open(output / "data_trace" / f"rank{env.rank:05d}.jsonl", "a")  # noqa: SIM115 - open for the run
    stragglers = StragglerMonitor(
        training.straggler_interval,
        training.straggler_margin,
        training.straggler_samples,
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        str(distributed.collective_device()),
    )
    delay = injected_delay(env.rank)  # a test hook (stragglers.DELAY_ENVIRONMENT); 0 in real runs
    while iteration < training.train_steps:
        distributed.heartbeat(iteration + 1, "training step", training.collective_timeout_s)
        timed = stragglers.due(iteration + 1)
        data_started = clock(timed)
        data = feed.next_step()
        data_seconds = clock(timed) - data_started
        inputs, batches = data.inputs, data.meta
        if trace is not None:
            for batch in batches:
                line = {k: batch[k] for k in ("lane", "source", "positions")}
                trace.write(json.dumps({"step": iteration + 1, **line}) + "\n")
            trace.flush()
        results.observe(inputs)
        if training.neftune_alpha > 0:  # each micro-batch's noise follows from its data (exact resume)
            inputs = [
                {**batch, "noise_seed": noise_seed(training.seed, meta)}
                for batch, meta in zip(inputs, batches, strict=True)
            ]
        if iteration + 1 == first_step and env.rank == 0:
            step_started = time.perf_counter()
            fp8 = run.precision.fp8
            logger.info(
                "step %d: parameters on %s, batch on %s%s",
                first_step,
                _placement(p for chunk in chunks for p in chunk.parameters()),
                _placement(v for v in inputs[0].values() if isinstance(v, torch.Tensor)),
                f", fp8 {fp8} via {backend.fp8_backend(run.precision.fp8_backend)}" if fp8 else "",
            )
        step_started_timed = clock(timed)
        if delay:
            time.sleep(delay)
        step = train_step(model, optimizer, inputs, timed=timed)
        if timed:
            seconds = clock(timed) - step_started_timed
            report = stragglers.observe(
                iteration + 1,
                {
                    "data": data_seconds,
                    "compute": seconds - step["grad_sync_s"] - step["optimizer_s"],
                    "grad_sync": step["grad_sync_s"],
                    "optimizer": step["optimizer_s"],
                },
            )
            metrics.write_rank_times(report.step, report.times)
            for line in report.named if env.rank == 0 else []:
                logger.warning("step %d | %s", report.step, line)
        if iteration + 1 == first_step and env.rank == 0:
            logger.info("step %d done in %.1f s", first_step, time.perf_counter() - step_started)
        if step["updated"] and math.isfinite(step["loss"]):
            scheduler.step(increment=1)
        else:
            skipped_steps += 1
            logger.warning(
                "step %d: non-finite loss or gradients, update skipped (%d so far)", iteration + 1, skipped_steps
            )
            if skipped_steps > training.max_nonfinite_steps:
                raise RuntimeError(
                    f"{skipped_steps} steps with NaN/Inf loss or gradients (limit "
                    f"{training.max_nonfinite_steps}): lower the learning rate or check the data"
                )
        iteration += 1
        # Counted where the micro-batches were made (the pixel masks are on the first stage only).
        window["tokens"] += sum(b["num_tokens"] for b in batches)
        window["images"] += sum(b["num_images"] for b in batches)
        window["flops"] += sum(b["flops"] for b in batches)
        # The decoder computes each micro-batch's packed length (real tokens, padded up to its multiple).
        window["positions"] += step["positions"]
        window["patches"] += sum(b["patches"] for b in batches)
        window["vision_positions"] += sum(b["vision_positions"] for b in batches)
        window["steps"] += 1

        if evaluator is not None and (iteration % training.eval_interval == 0 or iteration == training.train_steps):
            distributed.heartbeat(iteration, "evaluation", training.checkpoint_timeout_s)
            with parameters_gathered(model):
                losses = evaluator.run(model)
            window_start += evaluator.seconds  # throughput and MFU count training time only
            validation = {source: result.loss for source, result in losses.items()}
            metrics.write_validation(iteration, validation)
            if reports:
                logger.info(
                    validation_line(
                        iteration,
                        training.train_steps,
                        {source: (result.loss, result.tokens) for source, result in losses.items()},
                        evaluator.seconds,
                    )
                )

        if benchmarks is not None and benchmarks.due(iteration, training.train_steps):
            distributed.heartbeat(iteration, "benchmarks", training.checkpoint_timeout_s)
            seen = consumed_so_far(feed.state_dict())
            with parameters_gathered(model):
                entry = benchmarks.run(chunks, iteration, seen)
            window_start += benchmarks.seconds  # throughput and MFU count training time only
            metrics.write_benchmarks(entry)
            if reports:
                logger.info(benchmark_line(entry, training.train_steps, benchmarks.seconds))

        if iteration % training.log_interval == 0 or iteration == training.train_steps:
            totals = torch.tensor(
                [window[name] for name in WINDOW_SUMS],
                dtype=torch.float64,
                device=distributed.collective_device(),
            )
            torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
            elapsed = time.perf_counter() - window_start
            achieved = totals[2].item() / elapsed / 1e12  # model FLOPs of all data-parallel replicas
            last = {
                "loss": step["loss"],
                "learning_rate": optimizer.param_groups[0]["lr"],
                "grad_norm": step["grad_norm"],
                "tokens_per_second": totals[0].item() / elapsed,
                "images_per_second": totals[1].item() / elapsed,
                "tflops_per_second": achieved,
                "mfu": achieved / (peak_tflops * env.world_size),
                "memory_gib": memory.process_peak_bytes() / 2**30,
                "skipped_samples": float(sum(feed.skipped.values())),
                "skipped_steps": float(skipped_steps),
                "real_token_fraction": totals[0].item() / max(totals[3].item(), 1.0),
                "real_patch_fraction": totals[4].item() / totals[5].item() if totals[5].item() else 1.0,
            }
            metrics.write(iteration, last)
            results.add_window(
                *totals[:3].tolist(), seconds=elapsed, steps=window["steps"], step=iteration, loss=step["loss"]
            )
            if reports:
                seconds_per_step = elapsed / window["steps"]
                evaluation_seconds = 0.0
                if evaluator is not None:
                    # Until the first evaluation has been timed: a forward pass is about a third of
                    # a training step's work per micro-batch.
                    each = evaluator.seconds or (
                        seconds_per_step * evaluator.micro_batches(len(model)) / micro_batches_per_step / 3
                    )
                    evaluation_seconds = each * evaluations_left(
                        iteration, training.train_steps, training.eval_interval
                    )
                logger.info(log_line(iteration, training.train_steps, last, seconds_per_step, evaluation_seconds))
            window_start, window = time.perf_counter(), new_window()

        if writer.pending:  # publish the previous save once every rank has written it
            distributed.heartbeat(iteration, "checkpoint finalize", training.checkpoint_timeout_s)
            writer.maybe_finalize()
        preempted = preemption.requested()
        if iteration % training.save_interval == 0 or iteration == training.train_steps or preempted:
            distributed.heartbeat(iteration, "checkpoint save", training.checkpoint_timeout_s)
            with parameters_gathered(model):  # the weights the step left, snapshotted before returning
                checkpoint.save_training_checkpoint(
                    checkpoints,
                    iteration,
                    chunks,
                    optimizer,
                    scheduler,
                    feed.state_dict(),
                    run.model,
                    run.trainable,
                    training.keep_last,
                    writer,
                    on_saved=saved,
                )
            if preempted or not training.async_save:
                writer.wait()
        if preempted:
            logger.info("preempted at step %d: checkpoint written, exiting for requeue", iteration)
            break
    distributed.heartbeat(iteration, "finishing", training.checkpoint_timeout_s)
    writer.close()  # the last checkpoint is published before the run ends
    metrics.close()
    if trace is not None:
        trace.close()
    lock.release()
    seen = consumed_so_far(feed.state_dict())
    history = benchmarks.history if benchmarks is not None else []
    results.write(output / "results.json", iteration, last, validation, history, seen)
    distributed.shutdown()
    scores = {f"benchmark/{k}": v for k, v in scalars(history[-1]).items()} if history else {}
    return {"iteration": iteration, **last, **{f"validation_loss/{k}": v for k, v in validation.items()}, **scores}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from megatron_vlm.config import load_run_config

    parser = argparse.ArgumentParser(
        description="Idefics2 pretraining on Megatron-Core",
        epilog="example: python -m megatron_vlm.train --config examples/tiny_cpu.yaml training.lr=1e-3",
    )
    parser.add_argument("--config", required=True, help="run config YAML (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    for noisy in ("megatron", "megatron.core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run = load_run_config(args.config, args.overrides)
    result = pretrain(run)
    logger.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0
