"""Export and verify wherever the model lives (CUDA on a GPU host), and the dtype a conversion
keeps by default."""

import json

import pytest
import torch
from parity import run_tool
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_vlm.config import load_model_preset
from megatron_vlm.conversion.hf_io import HFCheckpoint, ShardedSafetensorsWriter, write_safetensors
from megatron_vlm.conversion.verify import random_hf_model


def awkward_tensors() -> dict[str, torch.Tensor]:
    """Tensors that are not plain contiguous CPU tensors: a transposed parameter (autograd
    attached), a strided slice, a bfloat16 view with a storage offset."""
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    return {
        "transposed": parameter.t(),
        "strided": torch.randn(8, 9)[::2, 1::3],
        "offset": torch.randn(10, 3).to(torch.bfloat16)[4:],
    }


def test_safetensors_writers_copy_any_tensor_to_host(tmp_path):
    tensors = awkward_tensors()
    write_safetensors(tmp_path / "one.safetensors", tensors)
    loaded = load_file(str(tmp_path / "one.safetensors"))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.detach()), name

    writer = ShardedSafetensorsWriter(tmp_path / "sharded", max_shard_bytes=64)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.commit()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    for name, tensor in tensors.items():
        with safe_open(str(tmp_path / "sharded" / index[name]), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensor.detach()), name


def test_inputs_go_to_the_device_of_the_model():
    """The helper verify uses: the model's device, wherever it was moved ('meta' here, CUDA on
    a GPU host)."""
    from megatron_vlm.conversion.verify import model_device, on_model_device

    model = torch.nn.Linear(2, 2).to("meta")
    assert model_device([model]).type == "meta"
    inputs = on_model_device([model], {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": None})
    assert inputs["input_ids"].device.type == "meta" and inputs["input_ids"].dtype == torch.long
    assert inputs["labels"] is None


@pytest.mark.parametrize(
    ("config", "stored", "expected"),
    [
        ({"torch_dtype": "float32"}, [torch.float32], ("float32", "the source's dtype")),
        ({"dtype": "bfloat16"}, [torch.bfloat16], ("bfloat16", "the source's dtype")),
        ({}, [torch.bfloat16, torch.bfloat16], ("bfloat16", "the source's dtype")),  # from the tensors
        ({}, [torch.bfloat16, torch.float32], ("float32", "the source stores mixed dtypes")),
        ({"torch_dtype": "float16"}, [torch.float16], ("float32", "the source stores float16; float32 holds it")),
    ],
)
def test_conversion_keeps_the_source_dtype_by_default(tmp_path, config, stored, expected):
    from megatron_vlm.conversion.convert import source_dtype

    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {f"t{i}": torch.zeros(2, dtype=dtype) for i, dtype in enumerate(stored)}
    tensors["count"] = torch.zeros(1, dtype=torch.int64)  # integer buffers do not vote
    save_file(tensors, str(tmp_path / "model.safetensors"))
    dtype, reason = source_dtype(HFCheckpoint(tmp_path))
    assert dtype == expected[0] and reason.startswith(expected[1])


@pytest.mark.gpu
def test_convert_export_and_verify_on_a_gpu(tmp_path):
    """The tools as a user runs them on a GPU host, where the model lives on CUDA."""
    assert torch.cuda.is_available()
    random_hf_model(load_model_preset("tiny"), seed=5).save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    run_tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "megatron"))
    output = run_tool("verify_conversion.py", "--hf", str(tmp_path / "hf"), "--megatron", str(tmp_path / "megatron"))
    result = json.loads(output.strip().splitlines()[-1])
    assert result["passed"] and result["dtype"] == "float32" and result["top1_agreement"] == 1.0, result
    run_tool("convert_megatron_to_hf.py", "--megatron", str(tmp_path / "megatron"), "--out", str(tmp_path / "out"))
    for directory in ("hf", "out"):
        index = json.loads((tmp_path / directory / "model.safetensors.index.json").read_text())["weight_map"]
        tensors = {}
        for name, file in index.items():
            with safe_open(str(tmp_path / directory / file), "pt") as handle:
                tensors[name] = handle.get_tensor(name)
        if directory == "hf":
            original = tensors
    assert set(tensors) == set(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
