"""Train the shipped pretrained model: ResNet-20 (1 input channel, 10 classes) on Fashion-MNIST.

Writes ``sgcompress/assets/resnet20_fashion_mnist.safetensors`` (fp32 state_dict) and
``sgcompress/assets/resnet20_fashion_mnist.json`` (architecture, data, accuracies,
command, versions, time). The model kept is the epoch with the best validation
accuracy (validation = 10 % of the training images); the test accuracy is measured
once, at the end, on the 10,000 official test images.

Resumable: the full training state is saved after every epoch to ``--state`` (plain
tensors and numbers, loaded with ``weights_only=True``); rerunning the same command
continues after the last finished epoch and gives the same result as an uninterrupted
run.

    PYTHONPATH=. .venv/bin/python scripts/train_zoo_model.py \
        --data /usr/share/datasets/fashion-mnist --epochs 6
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sgcompress.data import load_data  # noqa: E402
from sgcompress.zoo import MODELS  # noqa: E402

ARCH = "resnet20"


def lr_at(step: int, total: int, peak: float, warm_frac: float = 0.15) -> float:
    """One-cycle schedule: linear warm-up from peak/25 to peak, cosine down to ~0."""
    warm = max(1, int(total * warm_frac))
    if step < warm:
        return peak / 25 + (peak - peak / 25) * step / warm
    t = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t))) + 1e-5


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(1, total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many finished epochs (rerun the same command to resume)")
    p.add_argument("--state", type=Path, default=REPO / "runs" / "train_zoo" / "state.pt")
    p.add_argument("--out", type=Path, default=REPO / "sgcompress" / "assets" / "resnet20_fashion_mnist")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    command = "PYTHONPATH=. .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])
    )

    bundle = load_data(args.data, input_shape=(1, 28, 28), val_fraction=0.1, seed=args.seed,
                       augment=True, limit=args.limit)
    print(f"data {bundle.name}: train {len(bundle.train)}, val {len(bundle.val)}, "
          f"test {len(bundle.test) if bundle.test is not None else 0}, mean {bundle.mean}, std {bundle.std}",
          flush=True)

    torch.manual_seed(args.seed)
    arch_kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, "width": 16}
    model = MODELS[ARCH](**arch_kwargs)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(bundle.train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    start_epoch, best_val, best_state, seconds, history = 0, -1.0, None, 0.0, []
    if args.state.is_file():
        st = torch.load(args.state, map_location="cpu", weights_only=True)
        if st["epochs"] != args.epochs or st["seed"] != args.seed or st["lr"] != args.lr \
                or st.get("limit") != args.limit:
            raise SystemExit(f"{args.state} was written with other settings; delete it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start_epoch, best_val, best_state = st["epoch"], st["best_val"], st["best_state"]
        seconds, history = st["seconds"], list(st["history"])
        print(f"resumed after epoch {start_epoch} (best val {best_val:.4f})", flush=True)

    val_loader = DataLoader(bundle.val, batch_size=512, shuffle=False)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        # per-epoch seeds: shuffling and augmentation are the same whether resumed or not
        torch.manual_seed(args.seed * 1000 + epoch)
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = DataLoader(bundle.train, batch_size=args.batch_size, shuffle=True, generator=g, drop_last=False)
        model.train()
        loss_sum = n_sum = 0
        for i, (x, y) in enumerate(loader):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, args.lr)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.0)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at epoch {epoch + 1} step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.numel()
            n_sum += y.numel()
            if i % 100 == 0:
                print(f"  epoch {epoch + 1} step {i}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"lr {opt.param_groups[0]['lr']:.4f} ({time.time() - t0:.0f}s)", flush=True)
        val_acc = evaluate(model, val_loader)
        dt = time.time() - t0
        seconds += dt
        history.append([epoch + 1, loss_sum / max(1, n_sum), val_acc, dt])
        if val_acc > best_val:
            best_val = val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / max(1, n_sum):.4f} "
              f"val acc {val_acc:.4f} (best {best_val:.4f}) {dt:.0f}s", flush=True)
        args.state.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.state.with_suffix(".tmp")
        torch.save({
            "epoch": epoch + 1, "epochs": args.epochs, "seed": args.seed, "lr": args.lr, "limit": args.limit,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "best_val": best_val,
            "best_state": best_state, "seconds": seconds, "history": history,
        }, tmp)
        tmp.replace(args.state)
        if args.stop_after is not None and epoch + 1 >= args.stop_after and epoch + 1 < args.epochs:
            print(f"stopping after epoch {epoch + 1}; rerun the command to resume", flush=True)
            return 0

    assert best_state is not None
    model.load_state_dict(best_state)
    test_acc = evaluate(model, DataLoader(bundle.test, batch_size=512, shuffle=False))
    print(f"TEST accuracy of the best-val model: {test_acc:.4f}", flush=True)

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert all(v.dtype in (torch.float32, torch.int64) for v in tensors.values())
    weights = args.out.with_suffix(".safetensors")
    save_file(tensors, str(weights), metadata={"arch": f"sgcompress:{ARCH}"})
    meta = {
        "arch": f"sgcompress:{ARCH}",
        "arch_kwargs": arch_kwargs,
        "num_classes": bundle.num_classes,
        "input_shape": [bundle.in_channels, *bundle.image_size],
        "dataset": bundle.name,
        "dataset_path": str(args.data),
        "split": {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test),
                  "val_fraction": 0.1, "seed": args.seed},
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "val_accuracy": round(best_val, 4),
        "test_accuracy": round(test_acc, 4),
        "parameters": sum(p_.numel() for p_ in model.parameters()),
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "SGD nesterov momentum 0.9",
                     "peak_lr": args.lr, "schedule": "one-cycle (linear warm-up 15 %, cosine)",
                     "weight_decay": args.weight_decay, "weight_decay_on": "conv and linear weights (not BN, not biases)",
                     "augmentation": "random crop (pad 4) + horizontal flip",
                     "threads": args.threads, "history": [
                         {"epoch": e, "train_loss": round(l, 4), "val_accuracy": round(v, 4), "seconds": round(s, 1)}
                         for e, l, v, s in history]},
        "command": command,
        "torch_version": torch.__version__,
        "seconds": round(seconds, 1),
    }
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {weights} and {weights.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
