"""Run under torchrun: HF-parity of logits and one training step at a given TP/PP(/VPP) layout.

Every rank builds the same tiny HF Idefics2 (same seed), loads it through the mapping table and
writes ``rank{N}.json`` into --out with what it measured.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on frozen backbones")
    parser.add_argument("--dora", action="store_true", help="the adapters are DoRA's (implies --lora)")
    parser.add_argument("--dp-split", action="store_true", help="each data-parallel rank takes its own micro-batches")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--overlap-grad-reduce", action="store_true")
    parser.add_argument("--overlap-param-gather", action="store_true")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--large-images", action="store_true", help="also check logits on stage-2 (980 px) images")
    parser.add_argument(
        "--count-syncs",
        action="store_true",
        help="count pipeline shape exchanges and device syncs, with the batched p2p branch a GPU takes",
    )
    parser.add_argument(
        "--save", action="store_true", help="after training, save the model (adapters too) and its logits into --out"
    )
    parser.add_argument(
        "--answers-only",
        action="store_true",
        help="before training: the loss with only the rows' second halves trained on (fine-tuning's mask) vs transformers'",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from parity import (
        counted_checkpoints,
        hf_inputs,
        hf_logits,
        hf_model,
        make_batch,
        megatron_inputs,
        recompute_granularities,
        tiny_config,
        training_inputs,
    )

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig, PrecisionConfig, TrainableConfig
    from megatron_vlm.conversion.mapping import load_hf_weights
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.models.lora import apply_trainable
    from megatron_vlm.models.pipeline import forward_logits
    from megatron_vlm.training.step import build_optimizer, parameters_gathered, train_step, wrap_ddp

    config = tiny_config()
    parallel = ParallelConfig(
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        virtual_pipeline=args.vpp,
        decoder_layers_in_first_stage=args.first_stage_layers,
        recompute=args.recompute,
        sequence_parallel=args.sequence_parallel,
    )
    distributed.initialize(parallel, config, seed=1234)
    rank = torch.distributed.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    result: dict = {"rank": rank, "tp_rank": tp_rank, "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}

    hf = hf_model(config)
    state = hf.state_dict()
    chunks = build_model_chunks(config, parallel, PrecisionConfig())
    load_hf_weights(chunks, state.__getitem__, set(state), config, tp_rank, args.tp)
    result["decoder_layers"] = [len(c.language_model.decoder.layers) for c in chunks]
    result["has_vision"] = [c.vision is not None for c in chunks]
    # Distributed-checkpoint view: every tensor's global shape must not depend on the layout.
    result["checkpoint_shapes"] = {
        entry.key: list(entry.global_shape)
        for chunk in chunks
        for entry in chunk.sharded_state_dict().values()
        if hasattr(entry, "global_shape") and not entry.key.endswith("_extra_state")
    }

    if args.count_syncs:  # issue #27: no shape exchange, no whole-device sync per send / receive
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        counts = result["sync_counts"] = {"p2p": 0, "shape_exchanges": 0, "device_syncs": 0}

        def counted(name: str, function: object) -> object:
            def call(*call_args: object, **kwargs: object) -> object:
                counts[name] += 1
                return function(*call_args, **kwargs)

            return call

        P2PCommunicator._communicate = counted("p2p", P2PCommunicator._communicate)
        P2PCommunicator._communicate_shapes = counted("shape_exchanges", P2PCommunicator._communicate_shapes)
        torch.cuda.synchronize = counted("device_syncs", torch.cuda.synchronize)
        for chunk in chunks:  # the batched send/receive branch CUDA takes (common.transformer_kwargs)
            chunk.config.batch_p2p_comm = True

    # --- forward parity through the pipeline schedule
    batch = make_batch(config)
    inputs = megatron_inputs(batch)

    ours = forward_logits(chunks, inputs, config.text.vocab_size)
    if ours is not None:
        reference = hf_logits(hf, batch)
        valid = batch.padding.bool()
        result["logits_max_abs_diff"] = float((ours - reference)[valid].abs().max())
        result["logits_max_abs"] = float(reference[valid].abs().max())

    # --- stage-2 images: landscape, portrait and square at the 980 px limit (the full position table)
    if args.large_images:
        import dataclasses

        large = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=980))
        large_hf = hf_model(large)
        large_state = large_hf.state_dict()
        large_chunks = build_model_chunks(large, parallel, PrecisionConfig())
        load_hf_weights(large_chunks, large_state.__getitem__, set(large_state), large, tp_rank, args.tp)
        large_batch = make_batch(large, images_per_row=[[(560, 980)], [(980, 560), (980, 980)], []], seq_len=48)
        ours = forward_logits(large_chunks, megatron_inputs(large_batch), large.text.vocab_size)
        if ours is not None:
            valid = large_batch.padding.bool()
            large_reference = hf_logits(large_hf, large_batch)
            result["large_images_max_abs_diff"] = float((ours - large_reference)[valid].abs().max())
            result["large_images_max_abs"] = float(large_reference[valid].abs().max())
        del large_chunks, large_hf

    # --- training steps: one micro-batch with images, one without any image
    text_only = make_batch(config, seed=1, images_per_row=[[], [], [], []])
    micro_batches = [training_inputs(batch), training_inputs(text_only)]

    if args.answers_only:  # issue #23: the answer-only loss through the pipeline, against transformers'
        from megatron_vlm.data.batch import micro_batch, one_document_per_row
        from megatron_vlm.training.step import forward_backward, step_packed_length

        masked, references = [], []
        for synthetic in (batch, text_only):
            lengths = synthetic.padding.sum(dim=1)
            position = torch.arange(synthetic.input_ids.shape[1])[None, :]
            trained = (position >= (lengths // 2)[:, None]) & synthetic.padding.bool()  # the "answers"
            masked.append(
                micro_batch(
                    synthetic.input_ids,
                    one_document_per_row(synthetic.padding),
                    synthetic.pixel_values,
                    synthetic.pixel_mask,
                    synthetic.image_token_id,
                    trained,
                )
            )
            labels = synthetic.input_ids.masked_fill(~trained | (synthetic.input_ids == synthetic.image_token_id), -100)
            references.append((synthetic, labels))
        count = sum(int((labels[:, 1:] != -100).sum()) for _, labels in references)
        losses = forward_backward(chunks, masked, forward_only=True, length=step_packed_length(chunks, masked))
        if losses:
            total = sum(float(entry["lm loss"][0]) for entry in losses)
            tokens = sum(float(entry["lm loss"][1]) for entry in losses)
            with torch.no_grad():
                reference = sum(
                    float(hf(**hf_inputs(synthetic), labels=labels, num_items_in_batch=torch.tensor(count)).loss)
                    for synthetic, labels in references
                )
            full = sum(float(m["loss_mask"].sum()) for m in micro_batches)
            result["answers_only"] = {
                "loss": total / tokens,
                "tokens": tokens,
                "reference": reference,
                "reference_tokens": count,
                "all_tokens": full,
            }
    if args.dp_split:  # rank 0 gets the images, rank 1 a batch without any image
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        micro_batches = micro_batches[dp_rank::dp_size]
    args.lora = args.lora or args.dora
    if args.lora:
        apply_trainable(chunks, TrainableConfig(lora_rank=4, lora_alpha=8.0, dora=args.dora))
    frozen_before = {n: p.clone() for c in chunks for n, p in c.named_parameters() if not p.requires_grad}
    model = wrap_ddp(
        chunks,
        distributed_optimizer=args.distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
    )
    optimizer = build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            # Adam's first update is lr * g / (|g| + eps): for gradient elements near eps (the vision
            # patch embedding has some at 1e-8) it turns layouts' float32 rounding differences into
            # update differences. 1e-5 keeps step 2 a comparison of the updates, not of that noise.
            adam_eps=1e-5,
            clip_grad=1.0,
            weight_decay=0.0,
            use_distributed_optimizer=args.distributed_optimizer,
            overlap_param_gather=args.overlap_param_gather,
        ),
    )
    with counted_checkpoints() as checkpointed:
        result["steps"] = [train_step(model, optimizer, micro_batches) for _ in range(args.steps)]
    result["recompute"] = {"granularities": sorted(recompute_granularities(chunks)), "checkpoints": checkpointed[0]}
    # Overlapped parameter gathering: DDP's forward pre-hooks, and an optimizer that leaves it to them.
    result["param_gather_in_forward"] = all(c.use_forward_hook for c in model) and optimizer.config.overlap_param_gather
    if args.overlap_param_gather:  # the last update reaches the shards this rank does not own only now

        def checksum() -> float:
            return float(sum(p.detach().double().sum() for c in chunks for p in c.parameters()))

        result["checksum_after_step"] = checksum()
        with parameters_gathered(model):
            result["checksum_gathered"] = checksum()
    if args.save:  # what a later job loads elsewhere: the trained model at this layout, its logits
        from safetensors.torch import save_file

        from megatron_vlm.models.checkpoint_io import save_model

        trained = forward_logits(chunks, inputs, config.text.vocab_size)
        lora = TrainableConfig(lora_rank=4, lora_alpha=8.0, dora=args.dora) if args.lora else None
        save_model(chunks, args.out / "checkpoint", config, lora)
        if trained is not None and tp_rank == 0:
            save_file({"logits": trained.contiguous()}, str(args.out / "trained_logits.safetensors"))
    frozen_after = {n: p for c in chunks for n, p in c.named_parameters() if not p.requires_grad}
    result["frozen_parameters"] = len(frozen_before)
    result["frozen_unchanged"] = all(torch.equal(frozen_before[n], frozen_after[n]) for n in frozen_before)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
