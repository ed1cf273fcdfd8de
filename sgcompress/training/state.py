"""RNG streams, signals and finiteness: the pieces that make stop + resume exact."""

from __future__ import annotations

import random
import signal
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TrainingInterrupted


def seed_everything(seed: int) -> None:
    """Seed the global torch (CPU and CUDA), numpy and python RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng() -> dict[str, Any]:
    """Global RNG states as tensors and plain data (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def to_cpu(obj: Any) -> Any:
    """Copy every tensor inside nested dicts/lists to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def nonfinite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of floating tensors of the model (and optimizer state) holding NaN or Inf."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if optimizer is not None:
        for i, st in enumerate(optimizer.state.values()):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                    bad.append(f"optimizer state {i}.{k}")
    return bad


class SignalGuard:
    """While active, SIGINT/SIGTERM only record the signal; the loop stops at a step boundary.

    A second signal raises :class:`TrainingInterrupted` at once (no save). Previous handlers
    are restored on exit. Outside the main thread, signals cannot be caught: nothing is
    installed and the guard never fires.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(
                signum, f"aborted by a second {signal.Signals(signum).name}; the last saved resume state is kept"
            )
        self.signum = signum

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; workers ignore it
    so the main process can finish the step, save, and shut them down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
