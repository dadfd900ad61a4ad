"""Pretrained weights into a ZeRO-3 model with host memory bounded per rank.

transformers, under ZeRO-3, reads every checkpoint file whole on every rank (safetensors'
get_tensor for each key) and then lets rank 0 copy it in: for an 8B model on the 8 ranks of a node,
8 full copies in host memory at once. Here megajepa.model.build builds the model partitioned
(transformers' from_config under zero.Init) and load_partitions has each rank read from the
safetensors files only the byte range of its own partition of each tensor, with positional reads
(no whole-file copy, no memory map whose pages would count as resident), straight into its
`param.ds_tensor`. No collective is needed: ZeRO-3's partition of a parameter is a contiguous range
of its flattened elements (rank r holds [r * P, (r + 1) * P), P = ceil(numel / world)), and
safetensors stores each tensor contiguously, row-major. Host memory per rank at load: its own
partitions plus one tensor's partition in flight.

The safetensors format (a little-endian u64 header length, a JSON header of name -> dtype, shape,
data_offsets, then the data) is read directly; a sharded checkpoint's model.safetensors.index.json
maps names to files. Checkpoints without safetensors go through transformers' loader
(partitioned_loading warns).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and tensor."""


@dataclass(frozen=True)
class StoredTensor:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `path`

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def has_safetensors(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in (SINGLE_FILE, INDEX_FILE))


def _read_header(path: str) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header: {err}") from None
    data_start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: {name}: dtype {info['dtype']} is not supported here")
        tensors[name] = StoredTensor(path, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + info["data_offsets"][0])
    return tensors


def read_index(directory: str) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `directory`: where it is stored and how."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        tensors.update(_read_header(os.path.join(directory, name)))
    return tensors


def read_elements(stored: StoredTensor, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of the flattened tensor, read with pread into a fresh buffer."""
    out = torch.empty(count, dtype=stored.dtype)
    view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
    size = out.element_size()
    done, position = 0, stored.offset + start * size
    with open(stored.path, "rb", buffering=0) as f:
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], position + done)
            if got == 0:
                raise CheckpointError(f"{stored.path}: ends inside a tensor (truncated file?)")
            done += got
    return out


def _stored_name(name: str, tensors: dict[str, StoredTensor], prefix: str) -> str:
    """The checkpoint's name for model parameter `name`: as is, or with/without the base model's
    prefix (checkpoints saved from the bare transformer lack it)."""
    for candidate in (name, f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None):
        if candidate in tensors:
            return candidate
    raise CheckpointError(f"the checkpoint has no tensor for the model's parameter {name}")


def load_partitions(model: torch.nn.Module, directory: str) -> None:
    """Fill this rank's ZeRO-3 partitions (and the unpartitioned buffers) of `model` from the
    safetensors checkpoint in `directory`, reading only this rank's share of each tensor."""
    import torch.distributed as dist

    tensors = read_index(directory)
    prefix = getattr(model, "base_model_prefix", "model")
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = _stored_name(name, tensors, prefix)
            stored, shape = tensors[key], tuple(param.ds_shape)
            if stored.shape != shape:
                raise CheckpointError(f"{stored.path}: {key} has shape {list(stored.shape)}, the model's is {list(shape)}")
            part = param.ds_tensor.ds_numel
            start = part * dist.get_rank(group=param.ds_process_group)
            count = max(0, min(part, stored.numel - start))
            param.ds_tensor[:count].copy_(read_elements(stored, start, count))
            param.ds_tensor[count:].zero_()  # ZeRO's padding of the last partition
            used.add(key)
        for name, buffer in model.named_buffers():
            key = name if name in tensors else None
            if key is not None:  # persistent buffers are small and not partitioned: whole on every rank
                buffer.copy_(read_elements(tensors[key], 0, tensors[key].numel).view(buffer.shape))
                used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        warnings.warn(f"{directory}: {len(unused)} checkpoint tensor(s) the model has no place for, e.g. {unused[:3]}")


def partitioned_loading(directory: str, zero3: bool) -> bool:
    """Whether `directory` can be loaded partition by partition: under ZeRO-3, from safetensors.
    Under ZeRO-3 without safetensors, a warning: transformers' loader is used, every rank reads
    every file whole."""
    if not zero3:
        return False
    if has_safetensors(directory):
        return True
    warnings.warn(
        f"{directory}: no safetensors checkpoint; transformers' loader reads each file whole on every rank "
        "(convert the checkpoint to safetensors to keep host memory bounded)"
    )
    return False
