"""Mutation check (run by hand, not in CI): does the suite notice when the code is broken?

Each mutation below breaks one behaviour a test claims to check (the next-token shift, FP8 GEMMs,
document boundaries, the <image> loss mask, a TP split of the mapping table, the checkpoint
manifest, ...). For each, the repository (package, tests, tools, examples) is copied to a temporary
directory, the one text replacement is applied there (it must match exactly once: a stale mutation
is an error, not a pass), and the tests named for it run against the copy (``PYTHONPATH`` puts the
copy before the editable install; torchrun workers and tools inherit it). A mutation is *caught*
when every one of those tests fails, *survived* when any passes. The unmutated copy runs the same
tests first (unless ``--no-baseline``): a test that fails there says nothing about its mutation.

    python bench/mutations.py                    # every mutation; bench/results/mutations.{md,json}
    python bench/mutations.py --only next_token_shift_removed fp8_linears_return_zeros   # merged in
    python bench/mutations.py --list             # names, files and tests, nothing run

A full run takes about 25 minutes on 2 CPU cores (some catching tests launch torchrun processes).
Add a mutation with every test that claims a behaviour: its old text, its new text, and the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COPIED = ("megatron_vlm", "tests", "tools", "examples", "slurm", "bench", "pyproject.toml", "setup.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root
    breaks: str  # the behaviour, in words


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "next_token_shift_removed",
        "megatron_vlm/data/batch.py",
        "    labels = torch.roll(input_ids, shifts=-1, dims=1)\n",
        "    labels = input_ids.clone()\n",
        (
            "tests/test_validation.py::test_training_loss_is_the_token_weighted_mean_of_the_global_batch",
            "tests/test_data.py::test_packing_masks_positions_and_labels_respect_documents",
        ),
        "each position is trained to predict its own token instead of the next one",
    ),
    Mutation(
        "image_token_loss_mask_dropped",
        "megatron_vlm/data/batch.py",
        "    loss_mask = (document_ids >= 0) & next_same & (labels != image_token_id)\n",
        "    loss_mask = (document_ids >= 0) & next_same\n",
        (
            "tests/test_validation.py::test_training_loss_is_the_token_weighted_mean_of_the_global_batch",
            "tests/test_data.py::test_packing_masks_positions_and_labels_respect_documents",
        ),
        "positions before an <image> placeholder are trained to predict it",
    ),
    Mutation(
        "document_boundary_ignored_in_labels",
        "megatron_vlm/data/batch.py",
        "    loss_mask = (document_ids >= 0) & next_same & (labels != image_token_id)\n",
        "    loss_mask = (document_ids >= 0) & (labels != image_token_id)\n",
        ("tests/test_data.py::test_packing_masks_positions_and_labels_respect_documents",),
        "a document's last token is trained to predict the next document's first (or padding)",
    ),
    Mutation(
        "document_boundary_ignored_in_attention",
        "megatron_vlm/backbones/attention.py",
        "        starts[1:] &= (ids[1:] != ids[:-1]) | (torch.arange(1, ids.numel()) % seq == 0)\n",
        "        starts[1:] &= torch.arange(1, ids.numel()) % seq == 0\n",
        ("tests/test_model_parity.py::test_packed_documents_match_hf_document_by_document",),
        "documents packed in one row attend to each other (one causal sequence per row)",
    ),
    Mutation(
        "sliding_window_one_key_wider",
        "megatron_vlm/backbones/mistral.py",
        "window_size=None if text.sliding_window is None else (text.sliding_window - 1, 0),",
        "window_size=None if text.sliding_window is None else (text.sliding_window, 0),",
        (
            "tests/test_sliding_window.py::test_the_decoder_attends_each_packed_document_within_the_window",
            "tests/test_model_parity.py::test_sliding_window_matches_hf",
        ),
        "the decoder's sliding window sees one key more than Mistral's",
    ),
    Mutation(
        "tp_split_of_a_row_parallel_weight_transposed",
        "megatron_vlm/backbones/mistral.py",
        'Mapping(f"{layer}self_attention.linear_proj.weight", ("layers.*.self_attn.o_proj.weight",), Split.ROW),',
        'Mapping(f"{layer}self_attention.linear_proj.weight", ("layers.*.self_attn.o_proj.weight",), Split.COLUMN),',
        (
            "tests/test_parallel_parity.py::test_logits_match_hf[tp2pp1]",
            "tests/test_conversion.py::test_round_trip_through_tp2pp2_is_bit_exact_and_loads_in_transformers",
        ),
        "the decoder's attention output projection split over TP ranks on its output features",
    ),
    Mutation(
        "recompute_setting_not_passed_to_megatron",
        "megatron_vlm/backbones/common.py",
        "        **_RECOMPUTE[parallel.recompute],\n",
        '        **_RECOMPUTE["none"],\n',
        (
            "tests/test_cross_attention.py::test_recomputed_activations_give_the_same_loss_and_gradients",
            "tests/test_parallel_parity.py::test_training_steps_match_single_process[tp1pp1-full-recompute-tp1pp1]",
            "tests/test_parallel_parity.py::test_training_steps_match_single_process[tp2pp2-selective-recompute-tp1pp1]",
        ),
        "activation recompute never reaches Megatron-Core (the equivalence tests compare no-recompute with itself)",
    ),
    Mutation(
        "checkpoint_manifest_not_checked",
        "megatron_vlm/training/checkpoint.py",
        "            problems += integrity.check_files(path, manifest, names[rank::world])\n",
        "",
        ("tests/test_fault_tolerance.py::test_flipped_bytes_and_legacy_pickles_are_caught_without_running_them",),
        "a checkpoint's files are never compared with its manifest (sizes, CRC-32)",
    ),
    Mutation(
        "position_table_resized_transposed",
        "megatron_vlm/backbones/siglip.py",
        "    image = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)\n",
        "    image = table.float().reshape(1, old, old, -1).permute(0, 3, 2, 1)\n",
        ("tests/test_conversion.py::test_siglip_and_mistral_land_exactly_and_train",),
        "a SigLIP position table resized to another resolution comes out with its grid transposed",
    ),
    Mutation(
        "vision_position_ids_shifted_on_27_patch_tables",
        "megatron_vlm/backbones/siglip.py",
        "    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)\n",
        "    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=patches_per_side != 27)\n",
        ("tests/test_gpu_paths.py::test_vision_position_ids_do_not_depend_on_the_device",),
        "SigLIP-SO400M's 27-patch table: some grids' rows get the neighbouring position ids",
    ),
    Mutation(
        "mixture_weight_edited_in_stage1",
        "examples/data_mixtures/stage1.yaml",
        "weight: 0.70,",
        "weight: 0.50,",
        ("tests/test_data.py::test_paper_mixtures_are_followed",),
        "the stage-1 mixture no longer has the paper's 70/30 OBELICS/pairs split",
    ),
    Mutation(
        "loader_ignores_mixture_weights",
        "megatron_vlm/data/loader.py",
        '        index = int(np.searchsorted(np.cumsum(self.weights), draw, side="right"))\n',
        "        index = int(draw * len(self.weights))\n",
        ("tests/test_data.py::test_paper_mixtures_are_followed",),
        "sources are drawn uniformly whatever their weights",
    ),
    Mutation(
        "lora_adapters_get_no_gradient",
        "megatron_vlm/models/lora.py",
        "        update = module.lora(adapter_input).reshape(result.shape)\n",
        "        update = module.lora(adapter_input).detach().reshape(result.shape)\n",
        ("tests/test_design_parts.py::test_frozen_and_lora_regimes_on_every_architecture",),
        "LoRA adapters are applied but never trained",
    ),
    Mutation(
        "lora_freezes_embeddings_and_output_layer",
        "megatron_vlm/models/lora.py",
        '            frozen_prefixes.append("language_model.decoder.")\n',
        '            frozen_prefixes.append("language_model.")\n',
        ("tests/test_lora.py::test_paper_recipe_trains_adapters_connector_and_embeddings",),
        "with LoRA on the decoder the new tokens' embeddings and the output layer stop training",
    ),
    Mutation(
        "freezing_vision_also_freezes_the_decoder",
        "megatron_vlm/models/lora.py",
        '            frozen_prefixes.append("vision.")\n',
        '            frozen_prefixes.extend(["vision.", "language_model."])\n',
        ("tests/test_lora.py::test_each_part_freezes_independently",),
        "freezing one part freezes another",
    ),
    Mutation(
        "training_flops_without_the_backward",
        "megatron_vlm/perf/flops.py",
        "    return 3.0 * flops\n",
        "    return 2.0 * flops\n",
        ("tests/test_flops.py::test_training_step_count_matches_torch_counter_on_forward_and_backward",),
        "MFU's numerator counts the backward as one forward",
    ),
    Mutation(
        "training_flops_ignore_the_sliding_window",
        "megatron_vlm/perf/flops.py",
        "    if sliding_window is None or sliding_window >= length:\n",
        "    if True:\n",
        ("tests/test_flops.py::test_training_step_count_matches_torch_counter_on_forward_and_backward",),
        "MFU's numerator counts every causal pair where the window leaves fewer",
    ),
    Mutation(
        "generated_token_flops_ignore_the_sliding_window",
        "megatron_vlm/perf/flops.py",
        "        keys = min(keys, config.text.sliding_window)\n",
        "        keys = keys\n",
        ("tests/test_flops.py::test_generated_token_count_matches_torch_counter_on_cached_decoding",),
        "evaluation's FLOPs per generated token count keys outside the window",
    ),
    Mutation(
        "tasks_checkpoint_after_their_launcher_was_killed",
        "megatron_vlm/training/lifecycle.py",
        '    return f"Slurm job {job} is {state}: its batch script {how} (the launcher is gone), not checkpointing"\n',
        "    return None\n",
        ("tests/test_fault_tolerance.py::test_sigkill_of_srun_makes_the_tasks_exit_without_checkpointing",),
        "tasks whose srun was SIGKILLed take Slurm's teardown SIGTERM for a preemption and checkpoint",
    ),
    Mutation(
        "fp8_linears_return_zeros",
        "megatron_vlm/models/fp8.py",
        "output = _Fp8Matmul.apply(input, weight, RECIPES[recipe], allreduce_dgrad, tp_group, casts)",
        "output = _Fp8Matmul.apply(input, weight, RECIPES[recipe], allreduce_dgrad, tp_group, casts) * 0",
        (
            "tests/test_fp8.py::test_fp8_model_trains_like_its_bf16_twin",
            "tests/test_fp8.py::test_fp8_linear_output_and_gradients_close_to_fp32",
        ),
        "every FP8 linear returns zeros",
    ),
    Mutation(
        "fp8_weight_reshaped_not_transposed",
        "megatron_vlm/models/fp8.py",
        "torch._scaled_mm(input8, weight8.t(),",
        "torch._scaled_mm(input8, _column_major(weight8.reshape(weight8.shape[1], -1)),",
        (
            "tests/test_fp8.py::test_fp8_model_trains_like_its_bf16_twin",
            "tests/test_fp8.py::test_fp8_linear_output_and_gradients_close_to_fp32",
        ),
        "the FP8 forward GEMM reads its weight reshaped instead of transposed",
    ),
    Mutation(
        "fp8_casts_without_scaling",
        "megatron_vlm/models/fp8.py",
        "    scale = torch.finfo(dtype).max / amax\n",
        "    scale = torch.ones_like(amax)\n",
        (
            "tests/test_fp8.py::test_fp8_model_trains_like_its_bf16_twin",
            "tests/test_fp8.py::test_fp8_linear_output_and_gradients_close_to_fp32",
        ),
        "tensors are cast to FP8 unscaled: small gradients flush to zero",
    ),
    Mutation(
        "fp8_weight_gradient_scale_dropped",
        "megatron_vlm/models/fp8.py",
        "                scale_a=grad_scale,\n                scale_b=input_scale,",
        "                scale_a=torch.ones_like(grad_scale),\n                scale_b=input_scale,",
        (
            "tests/test_fp8.py::test_fp8_model_trains_like_its_bf16_twin",
            "tests/test_fp8.py::test_fp8_linear_output_and_gradients_close_to_fp32",
        ),
        "the weight-gradient GEMM forgets the gradient's scale",
    ),
    Mutation(
        "fp8_forward_input_in_e5m2",
        "megatron_vlm/models/fp8.py",
        "        input8, input_scale = casts.rows(rows, E4M3)\n",
        "        input8, input_scale = casts.rows(rows, E5M2)\n",
        ("tests/test_fp8.py::test_fp8_linear_output_and_gradients_close_to_fp32",),
        "the forward casts its input to e5m2 (the gradients' format) instead of e4m3",
    ),
    Mutation(
        "datasets_directory_second_data_file_ignored",
        "megatron_vlm/data/readers.py",
        'json.loads(state.read_text()).get("_data_files", [])]',
        'json.loads(state.read_text()).get("_data_files", [])][:1]',
        ("tests/test_preprocess_formats.py::test_obelics_documents_from_parquet_and_a_datasets_arrow_directory",),
        "a save_to_disk directory of several data files is read from its first only",
    ),
    Mutation(
        "mpi_preprocessing_all_units_on_rank_0",
        "megatron_vlm/data/preprocess.py",
        "            for number in range(rank, len(units), size):",
        "            for number in range(len(units)) if rank == 0 else ():",
        ("tests/test_preprocess_mpi.py::test_output_is_the_same_on_1_and_3_ranks",),
        "under mpiexec rank 0 does all the work and the other ranks none",
    ),
    Mutation(
        "dali_mean_one_grey_level_off",
        "megatron_vlm/data/dali.py",
        "                mean=[255 * m for m in config.mean],",
        "                mean=[255 * m + 1 for m in config.mean],",
        ("tests/test_dali.py::test_loader_with_dali_cpu_gives_the_same_batches",),
        "DALI normalises with a mean one grey level off (inside the max bound)",
    ),
    Mutation(
        "pillow_rescale_in_float32",
        "megatron_vlm/data/images.py",
        "    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)",
        "    scaled = (pixels.astype(np.float32) * (1 / 255)).astype(np.float32)",
        ("tests/test_dali.py::test_cpu_processors_return_cpu_float32_tensors",),
        "the Pillow path rescales in float32 where transformers' does in float64 (last-bit differences)",
    ),
    Mutation(
        "dali_reported_missing",
        "megatron_vlm/backend.py",
        '    return imports("nvidia.dali")',
        "    return False",
        ("tests/test_image_modes.py::test_preprocessing_stores_canonical_images_and_records_conversions",),
        "DALI is taken for absent: the DALI half of the image checks would be skipped",
    ),
    Mutation(
        "lora_checkpoint_without_the_tp_group",
        "megatron_vlm/models/lora.py",
        '            tp_group=getattr(base, "tp_group", None) or parallel_state.get_tensor_model_parallel_group(),\n',
        "",
        ("tests/test_parallel_parity.py::test_lora_checkpoint_saved_at_tp2pp2_loads_merged_at_tp1",),
        "LoRA adapters saved at TP > 1 as if every rank held the whole tensor",
    ),
    Mutation(
        "lora_gated_fc1_b_in_the_full_layout",
        "megatron_vlm/models/lora.py",
        "        if gated:  # B's rows (and DoRA's magnitudes) follow fc1's per-rank [gate_r; up_r] layout\n",
        "        if False:  # B's rows (and DoRA's magnitudes) follow fc1's per-rank [gate_r; up_r] layout\n",
        ("tests/test_parallel_parity.py::test_lora_checkpoint_saved_at_tp2pp2_loads_merged_at_tp1",),
        "the gated fc1 adapter's B saved without the per-rank [gate; up] layout: TP1 reads gate and up mixed",
    ),
    Mutation(
        "vqa_accuracy_scores_the_references",
        "megatron_vlm/evaluation/tasks/base.py",
        '        scores = {"accuracy": vqa_score((r["prediction"], r["references"]) for r in records)}\n',
        '        scores = {"accuracy": vqa_score((max(r["references"], key=r["references"].count), r["references"])'
        " for r in records)}\n",
        ("tests/test_readme_run.py::test_readme_command_trains_then_resumes",),
        "the benchmark accuracy a run logs is not that of its predictions (here: of the most common answer)",
    ),
    Mutation(
        "schedule_advances_on_skipped_steps",
        "megatron_vlm/training/loop.py",
        '        if step["updated"] and math.isfinite(step["loss"]):\n            scheduler.step(increment=1)\n',
        '        scheduler.step(increment=1)\n        if step["updated"] and math.isfinite(step["loss"]):\n            pass\n',
        ("tests/test_training.py::test_nonfinite_steps_are_skipped_then_the_run_stops",),
        "a step skipped for a non-finite loss still moves the learning-rate schedule",
    ),
    Mutation(
        "skipped_steps_metric_saturates",
        "megatron_vlm/training/loop.py",
        '"skipped_steps": float(skipped_steps),',
        '"skipped_steps": float(skipped_steps > 0),',
        ("tests/test_training.py::test_nonfinite_steps_are_skipped_then_the_run_stops",),
        "the skipped-steps metric stops counting at one",
    ),
    Mutation(
        "dora_row_parallel_norms_not_summed_over_tp",
        "megatron_vlm/models/lora.py",
        "        if self.row_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:\n",
        "        if False:\n",
        ("tests/test_parallel_parity.py::test_training_steps_match_single_process[tp2-sp-dora-tp1pp1-dora]",),
        "DoRA's norms of a row-parallel linear taken over this rank's input features only",
    ),
    Mutation(
        "dora_norm_of_the_base_weight_only",
        "megatron_vlm/models/lora.py",
        "        squares = (weight.float() + self.delta_weight().float()).square().sum(dim=1)\n",
        "        squares = weight.float().square().sum(dim=1)\n",
        ("tests/test_dora.py::test_dora_equals_peft_on_the_transformers_model",),
        "DoRA normalises by ||W|| instead of ||W + scale B A||",
    ),
    Mutation(
        "dora_scales_the_bias_too",
        "megatron_vlm/models/lora.py",
        "        added = own_bias if bias is None and isinstance(own_bias, torch.Tensor) and own_bias.numel() else None\n",
        "        added = None\n",
        ("tests/test_dora.py::test_dora_equals_peft_on_the_transformers_model",),
        "DoRA's magnitude scales a linear's bias as well (SigLIP's linears have biases)",
    ),
    Mutation(
        "neftune_noise_in_evaluation_too",
        "megatron_vlm/models/idefics2.py",
        "        if self.training and self.neftune_alpha > 0 and noise_seed is not None:\n",
        "        if self.neftune_alpha > 0 and noise_seed is not None:\n",
        ("tests/test_neftune.py::test_noise_only_while_training",),  # both families
        "NEFTune's noise is added in evaluation and generation as well",
    ),
    Mutation(
        "neftune_scale_by_the_row_not_the_document",
        "megatron_vlm/models/neftune.py",
        "    lengths = document_lengths_per_token(document_ids).to(torch.float32)\n",
        "    lengths = (document_ids >= 0).sum(dim=1, keepdim=True).expand_as(document_ids).to(torch.float32)\n",
        ("tests/test_neftune.py::test_the_noise_is_uniform_at_the_papers_scale_per_document_on_text_only",),
        "NEFTune's L is the packed row's token count instead of the sample's own",
    ),
    Mutation(
        "answer_mask_ignored_by_the_loss",
        "megatron_vlm/data/batch.py",
        "        loss_mask &= torch.roll(trained.bool(), shifts=-1, dims=1)\n",
        "        pass\n",
        (
            "tests/test_sft_data.py::test_the_answer_only_loss_equals_transformers",
            "tests/test_sft_data.py::test_the_loss_mask_of_a_packed_batch_is_on_the_answers",
            "tests/test_parallel_parity.py::test_the_answer_only_loss_through_the_pipeline_equals_transformers",
        ),
        "fine-tuning trains on every token, questions included (issue #23)",
    ),
    Mutation(
        "export_drops_decoder_layers",
        "megatron_vlm/conversion/convert.py",
        "                writer.add(hf_name, tensor)\n                report.tensors += 1\n",
        '                if "text_model.layers." not in hf_name:\n                    writer.add(hf_name, tensor)\n'
        "                report.tensors += 1\n",
        ("tests/test_backbones.py::test_converter_exports_a_checkpoint_written_before_the_redesign",),
        "the Megatron -> HF export leaves out every decoder layer",
    ),
    Mutation(
        "upscale_factor_uniform",
        "megatron_vlm/data/augment.py",
        "    factors = rng.triangular(UPSCALE_MIN, augmentation.upscale_max, augmentation.upscale_max, count)\n",
        "    factors = rng.uniform(UPSCALE_MIN, augmentation.upscale_max, count)\n",
        ("tests/test_sft_data.py::test_images_are_scaled_up_as_m4_draws_and_resized_once",),
        "up-scaling factors drawn uniformly instead of m4's triangular law (issue #23)",
    ),
    Mutation(
        "shuffled_turns_leave_the_images_behind",
        "megatron_vlm/data/augment.py",
        "    if lead and new_first_user is not None:\n",
        "    if False:\n",
        ("tests/test_sft_data.py::test_shuffled_turns_tokenize_as_transformers_with_the_conversations_images_first",),
        "after a shuffle, the images that open a conversation are dropped from the new first user turn",
    ),
    Mutation(
        "augmentation_not_redrawn_on_resume",
        "megatron_vlm/data/loader.py",
        "                    index = None if index < 0 else index\n",
        "                    index = None\n",
        (
            "tests/test_sft_data.py::test_an_augmented_stream_resumes_exactly_and_draws_anew_each_epoch",
            "tests/test_readme_run.py::test_the_tiny_sft_preset_fine_tunes_the_readme_runs_checkpoint",
        ),
        "a resumed run re-reads its pending documents without their augmentation",
    ),
    Mutation(
        "loss_token_weights_ignored",
        "megatron_vlm/data/loader.py",
        "                self.weights[i] * total - lane.loss_tokens[self.config.sources[i].name],\n",
        "                -lane.loss_tokens[self.config.sources[i].name],\n",
        ("tests/test_sft_data.py::test_mixture_weights_as_shares_of_the_answer_tokens",),
        "weights_of: loss_tokens balances the sources' answer tokens equally, whatever their weights",
    ),
    Mutation(
        "energon_reads_the_held_out_split",
        "tools/prepare_energon.py",
        '"--split-ratio", "1,0,0", "--sample-type", sample_type, "--exclude", "(^|/)validation/"]',
        '"--split-ratio", "1,0,0", "--sample-type", sample_type]',
        ("tests/test_energon.py::test_energon_prepares_and_reads_our_shards",),
        "energon is prepared over the held-out validation shards too (issue #26)",
    ),
    Mutation(
        "wandb_misses_the_validation_losses",
        "megatron_vlm/training/metrics.py",
        '        self._scalars(step, {f"validation/{source}/loss": loss for source, loss in losses.items()})\n',
        '        self._tensorboard(step, {f"validation/{source}/loss": loss for source, loss in losses.items()})\n',
        ("tests/test_readme_run.py::test_wandb_logs_what_tensorboard_logs",),
        "the validation losses reach TensorBoard but not W&B",
    ),
    Mutation(
        "straggler_wait_counted_as_work",
        "megatron_vlm/training/loop.py",
        '                    "compute": seconds - step["grad_sync_s"] - step["optimizer_s"],\n',
        '                    "compute": seconds - step["optimizer_s"],\n',
        ("tests/test_training.py::test_a_slow_rank_is_named_within_the_configured_steps",),
        "the gradient reduction's wait counts as a rank's own work, so every rank looks alike",
    ),
)


def copy_repository(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "runs", "results")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(f"mutation {mutation.name}: its text occurs {count} times in {mutation.file} (must be once)")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[list[str], float, str]:
    """(the named tests that failed, seconds, the run's last lines)."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # Scripts the tests run (the README's launcher, Slurm jobs) call `python`: this interpreter's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return list(tests), time.perf_counter() - started, f"timed out after {timeout} s"
    seconds = time.perf_counter() - started
    failing = [
        line.split(" ", 1)[1].split(" - ")[0]
        for line in done.stdout.splitlines()
        if line.startswith(("FAILED", "ERROR"))
    ]
    # A test named without its parameters fails when any of its parametrisations does.
    failed = [test for test in tests if any(f == test or f.startswith(test + "[") for f in failing)]
    if done.returncode not in (0, 1):  # collection errors, usage errors: every named test counts as failed
        failed = list(tests)
    return failed, seconds, "\n".join(done.stdout.splitlines()[-3:])


def check(mutation: Mutation, baseline: bool, timeout: int) -> dict:
    """Caught: every test named for the mutation fails on the mutated copy."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        result = {**asdict(mutation), "baseline_failed": None, "commit": commit.stdout.strip() or None}
        if baseline:
            failed, _, detail = run_tests(root, mutation.tests, timeout)
            result["baseline_failed"] = failed
            if failed:
                return {
                    **result,
                    "caught": None,
                    "missed_by": [],
                    "seconds": 0.0,
                    "detail": f"baseline fails: {detail}",
                }
        apply(mutation, root)
        failed, seconds, detail = run_tests(root, mutation.tests, timeout)
        missed = [test for test in mutation.tests if test not in failed]
        return {**result, "caught": not missed, "missed_by": missed, "seconds": round(seconds, 1), "detail": detail}


def table(results: list[dict], defined: int | None = None) -> str:
    lines = [
        f"# Mutation check ({date.today().isoformat()}, `python bench/mutations.py`)",
        "",
        "Each row breaks one behaviour in a copy of the repository and runs the tests that claim it.",
        "Caught: every one of those tests fails on the mutated copy (and passes on the unmutated one).",
        "at: the commit the row ran at (`--only NAME` reruns one; the file keeps every mutation's latest).",
        "",
        "| mutation | file | what it breaks | caught | by (each of these tests fails) | s | at |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = {True: "yes", False: "**NO**", None: "baseline fails"}[r["caught"]]
        tests = "<br>".join(
            f"{'missed: ' if t in r['missed_by'] else ''}`{t.removeprefix('tests/')}`" for t in r["tests"]
        )
        at = r.get("commit") or "?"
        lines.append(f"| `{r['name']}` | `{r['file']}` | {r['breaks']} | {verdict} | {tests} | {r['seconds']} | {at} |")
    caught = sum(1 for r in results if r["caught"])
    lines += ["", f"{caught} of {len(results)} mutations caught."]
    if defined is not None and defined > len(results):
        lines.append(f"{defined - len(results)} defined mutations have no result yet (`--only NAME` runs them).")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each mutation's tests")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where mutations.{md,json} go (merged with earlier runs)"
    )
    args = parser.parse_args()
    known = {m.name: m for m in MUTATIONS}
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown mutations {unknown}; known: {sorted(known)}")
    chosen = [known[name] for name in args.only] if args.only else list(MUTATIONS)
    if args.list:  # with whether each text still matches once (a stale mutation is an error when run)
        for m in chosen:
            found = (ROOT / m.file).read_text().count(m.old)
            state = "applies" if found == 1 else f"STALE: its text occurs {found} times"
            print(f"{m.name}  ({m.file}, {state}): {m.breaks}\n    " + "\n    ".join(m.tests))
        return 0
    results = []
    for mutation in tqdm(chosen, desc="mutations", unit="mutation"):
        results.append(check(mutation, not args.no_baseline, args.timeout))
        r = results[-1]
        verdict = {True: "caught", False: "SURVIVED", None: "baseline fails"}[r["caught"]]
        missed = f" missed by {r['missed_by']}" if r["missed_by"] else ""
        tqdm.write(f"{mutation.name}: {verdict} ({r['seconds']} s){missed}")
    print(table(results))
    # The results files hold every mutation defined: this run's results replace those of the same
    # name (and the same text: an edited mutation's old result is dropped), the rest are kept.
    saved = args.out / "mutations.json"
    previous = {r["name"]: r for r in json.loads(saved.read_text())} if saved.exists() else {}
    merged = {**previous, **{r["name"]: r for r in results}}
    current = [
        merged[m.name]
        for m in MUTATIONS
        if m.name in merged
        and (merged[m.name]["old"], merged[m.name]["new"], tuple(merged[m.name]["tests"])) == (m.old, m.new, m.tests)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutations.md").write_text(table(current, len(MUTATIONS)))
    saved.write_text(json.dumps(current, indent=1) + "\n")
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
