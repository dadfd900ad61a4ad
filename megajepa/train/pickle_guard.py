"""Loading checkpoint files without running code planted in them.

A `.pt` file is a zip whose `data.pkl` may name any Python callable; `torch.load(weights_only=False)`
calls it. Two kinds of file live in a megajepa checkpoint:

- ours (rng_rank{r}.pt, ema_rank{r}.pt): plain tensors, ints, floats, strings, lists and dicts,
  loaded with `load_plain` (torch.load with weights_only=True, which refuses anything else);
- DeepSpeed's (*_model_states.pt, *_optim_states.pt, and the universal checkpoint's files):
  DeepSpeed itself loads them with weights_only=False (engine.load_checkpoint, zero_to_fp32,
  ds_to_universal), and its optimizer files hold two of its own classes. Before any of those
  loads, `refuse_unsafe` reads each file's pickle *without executing it*
  (torch.serialization.get_unsafe_globals_in_checkpoint) and refuses a file that names any
  callable beyond torch's safe set and DEEPSPEED_GLOBALS.

Every place that hands our checkpoint files to DeepSpeed calls refuse_unsafe first:
megajepa.train.checkpoint (resume, the universal conversion) and megajepa.export.
"""

from __future__ import annotations

import os
import pickle
from typing import Iterable

import torch

# What DeepSpeed 0.19's checkpoint files name beyond torch's weights_only set (ZeRO stages 1-3,
# bf16/fp16/fp32: the stage enum and the loss scaler kept with the optimizer state).
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    }
)


class UnsafeCheckpointFile(RuntimeError):
    """A checkpoint file that would run code (or is not a readable torch file)."""


def load_plain(path: str):
    """torch.load of one of our own files: tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointFile(f"{path}: refused, holds more than plain tensors ({first})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UnsafeCheckpointFile(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None


def refuse_unsafe(paths: Iterable[str]) -> None:
    """Raise UnsafeCheckpointFile if any file's pickle names a callable outside the allowed set."""
    for path in paths:
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as err:  # a cut-short zip, or not a torch file at all
            raise UnsafeCheckpointFile(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None
        unexpected = sorted(set(named) - DEEPSPEED_GLOBALS)
        if unexpected:
            raise UnsafeCheckpointFile(
                f"{path}: refused, its pickle would call {', '.join(unexpected)} "
                "(neither tensors nor DeepSpeed's own checkpoint classes)"
            )


def torch_files(directory: str) -> list[str]:
    """The .pt files under `directory` (recursively: the universal checkpoint nests them)."""
    found = []
    for root, _, files in os.walk(directory):
        found.extend(os.path.join(root, name) for name in files if name.endswith(".pt"))
    return sorted(found)
