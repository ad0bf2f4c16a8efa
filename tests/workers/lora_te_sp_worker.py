"""Run under torchrun (TP2): LoRA on Transformer Engine's fused norm + column-parallel linear, whose
rules are emulated on CPU (``emulated_kernels.TeLayerNormLinearRules``, TE 2.0-2.3 and 2.4+), with and
without sequence parallelism. Rank 0 writes ``result.json`` into --out: per case, the largest
difference of each gradient (input, norm weight, linear weight, LoRA A and B) from the
single-process model ln(x) (W + scale B A)^T, and the largest gradient (the scale of the errors)."""

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENS, IN, OUT, RANK, ALPHA = 8, 16, 12, 4, 8.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from emulated_kernels import TeLayerNormLinearRules
    from megatron.core import parallel_state
    from parity import tiny_config

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.lora import LoRAAdapter, _add_adapter, linear_kind

    distributed.initialize(ParallelConfig(tensor_parallel=2), tiny_config(), seed=1234)
    group = parallel_state.get_tensor_model_parallel_group()
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()

    class TELayerNormColumnParallelLinear(torch.nn.Module):  # TE's name: LoRA attaches by class name
        def __init__(self, weight: torch.Tensor, norm: torch.Tensor, sequence_parallel: bool, version: str) -> None:
            super().__init__()
            self.config = SimpleNamespace(sequence_parallel=sequence_parallel)
            self.weight = torch.nn.Parameter(weight.clone())
            self.layer_norm_weight = torch.nn.Parameter(norm.clone())
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]
            self.return_layernorm_output = self.return_layernorm_output_gathered = False
            self.version = version

        def sharded_state_dict(self, *args: object, **kwargs: object) -> dict:  # read by LoRA's wrapper only
            return {}

        def forward(self, x: torch.Tensor) -> tuple:
            out, ln = TeLayerNormLinearRules.apply(
                x,
                self.layer_norm_weight,
                self.weight,
                1e-5,
                self.config.sequence_parallel,
                self.return_layernorm_output_gathered,
                self.version,
                group,
            )
            return ((out, ln), None) if self.return_layernorm_output else (out, None)

    generator = torch.Generator().manual_seed(0)
    x_full = torch.randn(TOKENS, 1, IN, generator=generator)
    g_full = torch.randn(TOKENS, 1, OUT, generator=generator)
    w_full = torch.randn(OUT, IN, generator=generator) / IN**0.5
    norm = 1 + 0.1 * torch.randn(IN, generator=generator)
    b_full = 0.5 * torch.randn(OUT, RANK, generator=generator)  # non-zero: the adapter's gradient matters
    columns = slice(rank * OUT // world, (rank + 1) * OUT // world)

    def gathered(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=group)
        return tensor

    results = {}
    for sequence_parallel in (True, False):
        for version in ("2.3", "2.10"):
            base = TELayerNormColumnParallelLinear(w_full[columns], norm, sequence_parallel, version)
            kind = linear_kind(type(base))
            adapter = LoRAAdapter(base, kind, RANK, ALPHA, 0.0, seed=11)
            _add_adapter(base, adapter, kind, gated=False)
            with torch.no_grad():
                adapter.b.copy_(b_full[columns])
            x = (x_full.chunk(world, dim=0)[rank] if sequence_parallel else x_full).clone().requires_grad_()
            out, _ = base(x)
            (out * g_full[..., columns]).sum().backward()
            # What finalize_model_grads does: sum the partial gradients of sequence-parallel parameters.
            ours = {
                "input": gathered(x.grad) if sequence_parallel else x.grad,
                "norm": summed(base.layer_norm_weight.grad) if sequence_parallel else base.layer_norm_weight.grad,
                "weight": gathered(base.weight.grad),
                "lora_a": summed(adapter.a.grad) if getattr(adapter.a, "sequence_parallel", False) else adapter.a.grad,
                "lora_b": gathered(adapter.b.grad),
            }
            # The single-process model.
            x_ref = x_full.clone().requires_grad_()
            norm_ref = norm.clone().requires_grad_()
            w_ref = w_full.clone().requires_grad_()
            a_ref = adapter.a.detach().clone().requires_grad_()
            b_ref = b_full.clone().requires_grad_()
            ln = x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_ref
            out_ref = ln @ (w_ref + (ALPHA / RANK) * b_ref @ a_ref).t()
            (out_ref * g_full).sum().backward()
            reference = {
                "input": x_ref.grad,
                "norm": norm_ref.grad,
                "weight": w_ref.grad,
                "lora_a": a_ref.grad,
                "lora_b": b_ref.grad,
            }
            results[f"{'sp' if sequence_parallel else 'tp'}-te{version}"] = {
                "errors": {name: float((ours[name] - reference[name]).abs().max()) for name in reference},
                "largest": max(float(grad.abs().max()) for grad in reference.values()),
                "gathered_output_asked": base.return_layernorm_output_gathered,
            }
    if rank == 0:
        (args.out / "result.json").write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
