"""Checkpoints a killed run can resume from: written atomically, the last K kept.

A checkpoint is a directory ``RUN/checkpoints/step-000012/`` holding ``state.pt``: the
trainable parameters, the optimiser and scheduler states, the states of the sampling and
selection random generators (and torch's / Python's global ones), the step, the question
order still to visit, and how many lines of ``metrics.jsonl`` / ``eval.jsonl`` /
``samples.jsonl`` belonged to the run at that step. It is built in a temporary directory
and renamed into place, so a kill -9 at any moment leaves either the old set of
checkpoints or the new one, never a half-written one that a resume would trust.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def count_lines(path: Path) -> int:
    """Complete lines (ending in a newline) of a text file; 0 if it does not exist."""
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return fh.read().count(b"\n")


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` complete lines of a file (drops lines written after a checkpoint)."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep, pos = 0, 0
    for _ in range(n):
        nxt = data.find(b"\n", pos)
        if nxt < 0:
            break
        pos = nxt + 1
        keep = pos
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data[:keep])
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` (see the module docstring) as checkpoint ``step``; keep the last ``keep``.

    The global torch and Python RNG states are added here.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = dict(state, torch_rng=torch.get_rng_state(), python_rng=random.getstate())
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as fh:
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint's state and restore the global torch / Python RNG states."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them, or only the LoRA adapter's).

    Views that share the parameters' storage, not copies: a copy would add the model's size to the
    peak memory of every save when all weights train (2 GB for a 0.5B model in fp32). Serialise them
    (``torch.save``) before the next optimiser step changes them.
    """
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back into ``model`` (names must match exactly)."""
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"checkpoint does not match the model: unknown parameter {missing[0]!r}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
