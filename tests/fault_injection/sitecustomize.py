"""Fault injection for tests/test_faults.py, loaded by Python at start-up when this directory is
on PYTHONPATH. In the rank named by FAULT_KILL_RANK, the FAULT_KILL_SAVE-th save of a ZeRO
optimizer-state file writes only half of it and then kills its own process with SIGKILL: a rank
dying mid-save, as a node failure would, with nothing in megajepa's code knowing about it."""

import os

if "FAULT_KILL_RANK" in os.environ and os.environ.get("RANK") == os.environ["FAULT_KILL_RANK"]:
    import signal

    import torch

    _real_save = torch.save
    _saves = {"count": 0}

    def _save_then_die(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith("optim_states.pt"):
            _saves["count"] += 1
            if _saves["count"] == int(os.environ["FAULT_KILL_SAVE"]):
                _real_save(obj, f, *args, **kwargs)
                size = os.path.getsize(f)
                with open(f, "r+b") as handle:
                    handle.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return _real_save(obj, f, *args, **kwargs)

    torch.save = _save_then_die
