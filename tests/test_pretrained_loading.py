"""Pretrained loading under ZeRO-3 (megajepa.model.pretrained), in real processes (gloo on CPU).

tests/_pretrained_worker.py loads a locally saved random Llama on every rank; here the gathered
weights are compared with the checkpoint as safetensors' own reader returns it, and (slow) the peak
resident memory per rank at load is compared with transformers' loader on a model of ~340 MB.
"""

import json
import os

import pytest
import torch
from _ranks import run_worker
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from megajepa.model.pretrained import CheckpointError, read_elements, read_index

MIB = 2**20


def _save_random_llama(directory, dtype, max_shard_size="5GB", **dims) -> dict:
    config = LlamaConfig(max_position_embeddings=128, **dims)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    return config.to_dict()


def _checkpoint(directory) -> dict[str, torch.Tensor]:
    """The oracle: every tensor of the checkpoint, through safetensors' own reader."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def run_ranks(out, world: int, *args: str) -> list[dict]:
    """tests/_pretrained_worker.py on `world` ranks; each rank's record."""
    run_worker("_pretrained_worker.py", out, world, *args, timeout=900.0)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_reads_element_ranges_of_a_sharded_checkpoint(tmp_path):
    model_dir = tmp_path / "model"
    _save_random_llama(
        model_dir, torch.bfloat16, max_shard_size="100KB", vocab_size=101, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    assert (model_dir / "model.safetensors.index.json").is_file()
    expected = _checkpoint(model_dir)
    stored = read_index(str(model_dir))
    assert set(stored) == set(expected)
    for name, tensor in expected.items():
        assert stored[name].shape == tuple(tensor.shape) and stored[name].dtype == tensor.dtype
        flat = tensor.reshape(-1)
        for start, count in ((0, flat.numel()), (flat.numel() // 3, flat.numel() // 2), (flat.numel() - 1, 1)):
            assert torch.equal(read_elements(stored[name], start, count), flat[start : start + count])


def test_refuses_a_directory_without_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_index(str(tmp_path))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_three_ranks_hold_exactly_the_checkpoint(tmp_path, tied):
    """A bf16 checkpoint in several files, loaded into fp32 partitions on 3 ranks (sizes not divisible
    by 3, so the last partition is padded): gathered, every parameter equals the checkpoint's."""
    model_dir = tmp_path / "model"
    _save_random_llama(
        model_dir, torch.bfloat16, max_shard_size="100KB", vocab_size=101, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=tied,
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    records = run_ranks(out, 3, "--model", str(model_dir), "--method", "megajepa", "--gather")
    gathered = torch.load(out / "gathered.pt")
    expected = _checkpoint(model_dir)
    names = set(expected) | ({"lm_head.weight"} if tied else set())
    assert set(gathered) | ({"lm_head.weight"} if tied else set()) == names
    for name, weight in gathered.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, expected[name].float()), name
    total = sum(t.numel() for t in expected.values()) * 4
    # each rank holds a third of the fp32 model (plus the padding of the last partitions)
    for record in records:
        assert total / 3 <= record["partition_bytes"] < total / 3 + 4 * 3 * len(expected)


@pytest.mark.slow
def test_peak_resident_memory_at_load_two_ranks(tmp_path):
    """A random Llama of ~340 MB (bf16, one file) loaded into fp32 ZeRO-3 partitions on 2 ranks:
    the peak resident memory each rank adds while loading, with transformers' loader (every rank
    reads the whole file) and with megajepa's (every rank reads its own half). The figures are
    printed (pytest -s) for the README."""
    model_dir = tmp_path / "model"
    _save_random_llama(
        model_dir, torch.bfloat16, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    )  # fmt: skip
    file_bytes = os.path.getsize(model_dir / "model.safetensors")
    added = {}
    for method in ("transformers", "megajepa"):
        out = tmp_path / method
        out.mkdir()
        records = run_ranks(out, 2, "--model", str(model_dir), "--method", method)
        added[method] = [r["peak"] - r["rss_before"] for r in records]
        partition = max(r["partition_bytes"] for r in records)
        print(
            f"{method}: checkpoint {file_bytes / MIB:.0f} MiB, fp32 partition {partition / MIB:.0f} MiB per rank, "
            f"resident before {[round(r['rss_before'] / MIB) for r in records]} MiB, "
            f"peak {[round(r['peak'] / MIB) for r in records]} MiB, added at load "
            f"{[round(a / MIB) for a in added[method]]} MiB"
        )
    # transformers' loader holds the whole file on every rank besides the partitions. Ours holds the
    # partitions plus what building under zero.Init costs whatever the loader (each module is built
    # whole in fp32 before it is partitioned: the largest, the 32000 x 1024 embedding, is 125 MiB),
    # and one tensor's partition in flight.
    largest = 32000 * 1024 * 4
    assert min(added["transformers"]) > partition + 0.9 * file_bytes
    assert max(added["megajepa"]) < partition + 2 * largest
