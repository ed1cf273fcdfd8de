"""Training as under torchrun: 2 CPU processes (gloo) on real data (scikit-learn's digits).

The two ranks are forked from the test process (torch is imported once, so this takes
seconds, not the half minute of a torchrun start) and join the process group exactly as
torchrun's workers do: from the WORLD_SIZE / RANK / LOCAL_RANK / MASTER_* environment.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import traceback

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks the ranks (Linux)")

EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, harness: str, data) -> None:
    """One rank: record every file it creates or writes under out_dir, train, report."""
    writes: list[list[str]] = []
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        root = os.path.realpath(out_dir)

        def audit(event, args):
            if event in ("open", "os.rename", "os.mkdir", "os.remove"):
                path = args[1] if event == "os.rename" else args[0]  # a rename creates its target
                if isinstance(path, (str, bytes, os.PathLike)):
                    path = os.path.realpath(os.fsdecode(path))
                    if path.startswith(root):
                        mode, flags = (args[1], args[2]) if event == "open" else ("w", 0)
                        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                            writes.append([event, os.path.relpath(path, root)])

        sys.addaudithook(audit)  # this forked process only
        from sgcompress.finetune import TrainConfig, train
        from sgcompress.layers import MaskedConv2d

        torch.set_num_threads(1)
        torch.manual_seed(0)
        conv = MaskedConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1))
        conv.set_mask((torch.rand(16, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float())
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), conv, nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))
        train_set, val_set = data
        cfg = TrainConfig(epochs=EPOCHS, lr=0.2, schedule="cosine", batch_size=16, max_steps_per_epoch=8, seed=5)
        res = train(model, train_set, val_set, cfg, out_dir)
        pruned = conv.weight_mask().expand_as(conv.weight) == 0
        torch.save(model.state_dict(), os.path.join(harness, f"weights{rank}.pt"))
        report = {"writes": writes, "history": res.history, "world": torch.distributed.get_world_size(),
                  "pruned_zero": bool((conv.weight[pruned] == 0).all())}
    except BaseException:
        report = {"error": traceback.format_exc()}
    with open(os.path.join(harness, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _stable(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


def test_two_process_training_agrees_and_only_rank0_writes(tmp_path):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    data = (TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:1301], y[1000:1301]))
    out_dir, harness = tmp_path / "run", tmp_path / "harness"
    harness.mkdir()
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(out_dir), str(harness), data)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (json.loads((harness / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    assert r0["world"] == r1["world"] == 2

    # Both ranks end with bitwise the same (best) weights, pruned connections at zero.
    w0, w1 = (torch.load(harness / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert r0["pruned_zero"] and r1["pruned_zero"]
    # Metrics are reduced over ranks: the same numbers on both, every validation image counted
    # once (301, odd: no padding), each rank trained on its own 16 images x 8 steps.
    assert _stable(r0["history"]) == _stable(r1["history"])
    assert [h["val_n"] for h in r0["history"]] == [301] * EPOCHS
    assert [h["train_images"] for h in r0["history"]] == [2 * 16 * 8] * EPOCHS
    # Rank 0 alone wrote files: the log, the best weights and the resume state.
    assert r1["writes"] == []
    assert {"train_log.jsonl", "best.safetensors", "last.pt"} <= {p for _, p in r0["writes"]}
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == list(range(1, EPOCHS + 1))
    state = torch.load(out_dir / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank RNG streams
