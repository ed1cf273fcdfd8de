"""Acceptance measurement: SG-CNN on ResNet-50 (groups 16, conv ratio 0.6, FC 0.6), as a user runs it.

    PYTHONPATH=. .venv/bin/python benchmarks/prune_resnet50.py --out results/prune_resnet50.json

1. torchvision resnet50, random weights (seeded), saved as a state_dict into a temp dir;
2. ``python -m sgcompress prune resnet50.pth --arch torchvision:resnet50 --groups 16 --ratio 0.6 -o A``
   (wall clock), then the same command into B: plan.json must be byte-identical;
3. ``python -m sgcompress report A --json``: MACs (fvcore) and params;
4. in process, the SG-CNN schedule alone (``sgcompress.sgcnn.sgcnn_prune``), timed, whose plan
   must also equal the CLI's.

Targets (issue): pruned-layer MACs -60 % +- 1 %; whole model 1.95 G +- 0.03 G MACs (dense 4.11 G);
schedule < 30 s on the 2-core dev box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS, RATIO = 16, 0.6
TARGETS = {"pruned_macs_reduction": (0.60, 0.01), "macs_g": (1.95, 0.03), "schedule_s_max": 30.0}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sgcompress", *args], check=False, env=env,
                          capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"sgcompress {' '.join(args)} failed with exit code {proc.returncode}")
    return dt, proc


def schedule_in_process(ckpt: Path) -> tuple[float, str, int]:
    """(seconds of sgcnn_prune alone, plan JSON, number of pruned layers), on the same checkpoint."""
    sys.path.insert(0, str(REPO))
    import sgcompress
    from sgcompress.selection import select_layers
    from sgcompress.sgcnn import sgcnn_prune
    from sgcompress.surgery import to_masked

    lm = sgcompress.load_model(ckpt, arch="torchvision:resnet50", input_shape=(3, 224, 224))
    config = sgcompress.PruneConfig(groups=GROUPS, ratio=RATIO)
    sel = select_layers(lm.model, lm.spec.input_shape, n_clusters=config.groups)
    to_masked(lm.model, sel.targets)
    kinds = {n: sel.layers[n].kind for n in sel.targets}
    t0 = time.perf_counter()
    plan = sgcnn_prune(lm.model, sel.targets, config, kinds=kinds, skipped=sel.skipped)
    return time.perf_counter() - t0, plan.to_json(), len(sel.targets)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where to write the results as JSON")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = ap.parse_args(argv)

    import torch
    import torchvision.models as tvm

    load_before = uptime()
    with tempfile.TemporaryDirectory(prefix="sgc-r50-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(args.seed)
        ckpt = tmp / "resnet50.pth"
        torch.save(tvm.resnet50(weights=None).state_dict(), ckpt)

        base = ["prune", str(ckpt), "--arch", "torchvision:resnet50", "--groups", str(GROUPS), "--ratio", str(RATIO)]
        prune_s, first = cli(*base, "-o", str(tmp / "a"))
        prune2_s, _ = cli(*base, "-o", str(tmp / "b"))
        plan_a = (tmp / "a" / "plan.json").read_bytes()
        identical = plan_a == (tmp / "b" / "plan.json").read_bytes()
        report_s, rep_proc = cli("report", str(tmp / "a"), "--json")
        rep = json.loads(rep_proc.stdout)
        sched_s, plan_json, n_layers = schedule_in_process(ckpt)
        in_process_identical = plan_json.encode() == plan_a
        weights_bytes = (tmp / "a" / "weights.safetensors").stat().st_size

    pl, o, c = rep["pruned_layers"], rep["original"], rep["compressed"]
    conv_layers = [x for x in rep["layers"] if x["kind"] == "conv"]
    results = {
        "command": " ".join(["sgcompress", *base[:1], "resnet50.pth", *base[2:], "-o", "OUT"]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "uptime_before": load_before, "uptime_after": uptime()},
        "pruned_layers": {"count": pl["count"], "conv_count": len(conv_layers),
                          "macs_before": pl["macs_before"], "macs_after": pl["macs_after"],
                          "macs_reduction": pl["macs_reduction"]},
        "model_macs": {"dense": o["macs"], "pruned": c["macs"], "ratio": rep["macs_ratio"]},
        "params": {"dense": o["params"], "effective": c["params_effective"], "stored": c["params_stored"],
                   "ratio": rep["params_ratio"]},
        "conv_sparsity": {"min": min(x["sparsity"] for x in conv_layers),
                          "max": max(x["sparsity"] for x in conv_layers)},
        "fc_sparsity": [x["sparsity"] for x in rep["layers"] if x["kind"] == "linear"],
        "seconds": {"prune_cli_wall": prune_s, "prune_cli_wall_second_run": prune2_s,
                    "report_cli_wall": report_s, "sgcnn_schedule_in_process": sched_s},
        "plan_identical_two_cli_runs": identical,
        "plan_identical_in_process": in_process_identical,
        "weights_file_bytes": weights_bytes,
        "cli_stderr_lines": [ln for ln in first.stderr.splitlines() if ln.strip()][:20],
        "skipped": rep["skipped"],
    }
    red = pl["macs_reduction"]
    checks = {
        "pruned_macs_reduction_60pct_pm1": abs(red - 0.60) <= 0.01,
        "model_macs_1.95G_pm0.03": abs(c["macs"] / 1e9 - 1.95) <= 0.03,
        "dense_macs_4.11G": abs(o["macs"] / 1e9 - 4.11) <= 0.01,
        "schedule_under_30s": sched_s < TARGETS["schedule_s_max"],
        "plan_identical": identical and in_process_identical,
    }
    results["checks"] = checks

    print(f"command: {results['command']}")
    print(f"machine: {results['machine']['cpus']} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"uptime before: {load_before}")
    print(f"uptime after:  {results['machine']['uptime_after']}")
    print(f"pruned layers: {pl['count']} ({len(conv_layers)} conv + {pl['count'] - len(conv_layers)} linear) "
          f"of {pl['count'] + len(rep['skipped'])} candidates; skipped {len(rep['skipped'])}")
    print(f"MACs of pruned layers: {pl['macs_before'] / 1e9:.4f} G -> {pl['macs_after'] / 1e9:.4f} G "
          f"(reduction {100 * red:.2f} %, target 60 +- 1 %)")
    print(f"whole-model MACs (fvcore): {o['macs'] / 1e9:.4f} G -> {c['macs'] / 1e9:.4f} G "
          f"({100 * rep['macs_ratio']:.2f} %; target 1.95 +- 0.03 G)")
    print(f"params: {o['params'] / 1e6:.3f} M -> {c['params_effective'] / 1e6:.3f} M effective "
          f"({100 * rep['params_ratio']:.2f} %)")
    print(f"conv sparsity: {results['conv_sparsity']['min']:.4f} .. {results['conv_sparsity']['max']:.4f}; "
          f"fc sparsity: {results['fc_sparsity']}")
    print(f"prune CLI wall: {prune_s:.1f} s (second run {prune2_s:.1f} s); report --json wall: {report_s:.1f} s")
    print(f"SG-CNN schedule alone (in process, {n_layers} layers, 6 steps): {sched_s:.1f} s (target < 30 s)")
    print(f"plan.json identical over two CLI runs: {identical}; equal to the in-process plan: {in_process_identical}")
    print(f"CLI stderr lines on success: {len(results['cli_stderr_lines'])}")
    print("checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
