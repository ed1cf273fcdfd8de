"""Where a forward pass spends its time: dense vs compact ResNet-50 (60 % removed, groups 4), batch 1.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_compact.py
Prints torch.profiler tables (self CPU time by operator, 10 forward passes each).
"""
import copy, torch, torchvision, tempfile
from pathlib import Path
from sgcompress.config import PruneConfig
from sgcompress.pipeline import prune_model
from sgcompress.artifact import save_artifact, make_manifest
from sgcompress.loading import ModelSpec
from sgcompress.export import export_compact
from sgcompress.surgery import strip_masks
torch.manual_seed(0)
base = torchvision.models.resnet50().eval()
m = copy.deepcopy(base); res = prune_model(m, (3,224,224), PruneConfig(groups=4, ratio=0.6))
d = Path(tempfile.mkdtemp())
save_artifact(d/"a", m, res.plan, make_manifest(ModelSpec("torchvision:resnet50", {}, 1000, (3,224,224)), stage="pruned", settings={}, source=None), res.report)
exp = export_compact(d/"a", None, batch_size=1, measure=False)
x = torch.randn(1,3,224,224)
from torch.profiler import profile, ProfilerActivity
for name, model in (("dense", base), ("compact", exp.model)):
    with torch.inference_mode():
        for _ in range(5): model(x)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(10): model(x)
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
