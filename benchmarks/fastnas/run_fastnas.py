"""FastNAS side by side, in one run: megatron-prune's FastNAS vs Model Optimizer's FastNAS vs Torch-Pruning vs
uniform width scaling vs random channels, on the Fashion-MNIST ResNet and MobileNetV2 at 50% and 30% FLOPs.

Every method gets the same pretrained model, the same budget (X% of the original FLOPs, each tool in its own
FLOPs convention), the same score function (accuracy on 1,000 held-out training images) and calibration
batches, and afterwards the same short fine-tune (SGD + distillation from the original). Reported: FLOPs and
parameters achieved (our counter and torchprofile's), test accuracy (10k images) right after pruning and after
the fine-tune, search wall/CPU time and score calls.

    bash scripts/setup_bench.sh                     # torchprofile (Model Optimizer's FLOPs), torch-pruning
    .venv/bin/python benchmarks/fastnas/run_fastnas.py   # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/fastnas/run_fastnas.py --models resnet --budgets 50 --finetune-steps 20   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402

from megatron_prune import fastnas  # noqa: E402
from megatron_prune.common import solver  # noqa: E402
from megatron_prune.common.choices import Rules  # noqa: E402
from megatron_prune.common.slicing import slice_model  # noqa: E402
from megatron_prune.fastnas.importance import kept_units, rank_channels  # noqa: E402
from megatron_prune.fastnas.space import build_space  # noqa: E402
from megatron_prune.fastnas.subnet import recalibrate_batchnorm  # noqa: E402

RESULTS = fmnist.REPO / "benchmarks/results/fastnas.json"
DIVISOR = 16  # both FastNAS implementations; the default 32 cannot prune these nets' 32-wide groups


def torchprofile_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Model Optimizer's FLOPs convention (its own function): 2 x torchprofile MACs, BatchNorm excluded."""
    from modelopt.torch.nas.utils import inference_flops

    with torch.no_grad():
        return float(inference_flops(copy.deepcopy(model).eval(), dummy_input=x, unit=1.0))


def ours_flops(model: nn.Module, x: torch.Tensor) -> dict:
    return build_space(copy.deepcopy(model).eval(), x, Rules.of({"*": {"divisor": DIVISOR}})).count()


class Counted:
    """score_func wrapper counting calls (accuracy on the score batches; `eval()` lets Model Optimizer recalibrate)."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __call__(self, model):
        self.calls += 1
        return fmnist.accuracy(model, self.batches)


def timed(fn):
    wall, cpu = time.time(), time.process_time()
    out = fn()
    return out, time.time() - wall, time.process_time() - cpu


def run_ours(model, x, budget_flops, loader, score, ckpt):
    pruned, result = fastnas.prune(model, constraints={"flops": budget_flops}, dummy_input=x, data_loader=loader,
                                   score_func=score, checkpoint=ckpt, config={"rules": {"*": {"divisor": DIVISOR}}})
    return pruned, {"widths": result.widths, "candidates": [(c.selector, c.score) for c in result.candidates]}


def run_modelopt(model, x, budget_flops, loader, score, ckpt):
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.fastnas import FastNASConfig

    cfg = FastNASConfig()
    for key in cfg.keys():
        rule = cfg[key]["*"]
        if rule is None:
            continue
        for field in ("channel_divisor", "feature_divisor"):
            if field in rule:
                rule[field] = DIVISOR
    pruned, state = mtp.prune(model=copy.deepcopy(model), mode=[("fastnas", cfg)], constraints={"flops": budget_flops},
                              dummy_input=x, config={"data_loader": loader, "score_func": score, "checkpoint": ckpt, "verbose": False})
    return pruned, {"is_satisfied": bool(state["best"]["is_satisfied"])}


def run_torch_pruning(model, x, budget_flops):
    """Torch-Pruning's standard channel pruner (group L2 magnitude, the same ratio for every layer) at the
    largest ratio whose FLOPs (our counter) fit the budget."""
    import torch_pruning as tp

    def prune_at(ratio):
        m = copy.deepcopy(model).eval()
        head = m.fc if hasattr(m, "fc") else m.classifier[-1]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                      ignored_layers=[head])
        pruner.step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ours_flops(prune_at(mid), x)["flops"] > budget_flops else (lo, mid)
    return prune_at(hi), {"pruning_ratio": hi}


def run_baseline(model, x, budget_flops, bn_batches, widths=None, seed=0):
    """Uniform width scaling (widths=None; channels by L2 norm) or random channels at given widths; BatchNorm
    recalibrated like ours."""
    base = copy.deepcopy(model).eval()
    space = build_space(base, x, Rules.of({"*": {"divisor": DIVISOR}}))
    if widths is None:
        widths = solver.uniform(space.searchable, {g: {w: 0.0 for w in c} for g, c in space.searchable.items()}, space.count, {"flops": budget_flops})
        orders = rank_channels(base, space, "l2_norm")
    else:
        g = torch.Generator().manual_seed(seed)
        orders = {k: torch.randperm(n, generator=g) for k, n in space.full.items()}
    pruned = slice_model(base, space.analysis.tensors, kept_units(orders, widths, space.full), space.analysis.depthwise)
    recalibrate_batchnorm(pruned, bn_batches, lambda m, b: m(b))
    return pruned.eval(), {"widths": widths}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet", "mobilenetv2"])
    p.add_argument("--budgets", nargs="+", type=float, default=[50, 30], help="percent of the original FLOPs")
    p.add_argument("--methods", nargs="+", default=["ours", "modelopt", "torch_pruning", "uniform", "random"])
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--score-images", type=int, default=1000)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = fmnist.load_fmnist()
    hold = len(xtr) - 5000
    train = fmnist.batches(xtr[:hold], ytr[:hold], 64, shuffle_seed=1)
    score_batches = fmnist.batches(xtr[hold:hold + args.score_images], ytr[hold:hold + args.score_images], 500)
    test = fmnist.batches(xte, yte, 1000)
    finetune = fmnist.batches(xtr[:hold], ytr[:hold], 128, shuffle_seed=2)
    x = torch.randn(1, 1, 28, 28)
    rows, scratch = [], Path(os.environ.get("TMPDIR", "/tmp")) / f"fastnas-bench-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        teacher = fmnist.pretrained(name)
        base = {"model": name, "original_flops": ours_flops(teacher, x)["flops"], "original_flops_torchprofile": torchprofile_flops(teacher, x),
                "original_params": sum(p.numel() for p in teacher.parameters()), "original_accuracy": fmnist.accuracy(teacher, test)}
        print(f"== {name}: {base}", flush=True)
        ours_widths = {}
        for pct in args.budgets:
            for method in args.methods:
                score = Counted(score_batches)
                budget = pct / 100 * (base["original_flops_torchprofile"] if method == "modelopt" else base["original_flops"])
                model = copy.deepcopy(teacher)
                if method == "ours":
                    fn = lambda: run_ours(model, x, budget, train, score, str(scratch / f"{name}-{pct:.0f}-ours.pt"))  # noqa: E731
                elif method == "modelopt":
                    fn = lambda: run_modelopt(model, x, budget, train, score, str(scratch / f"{name}-{pct:.0f}-modelopt.pth"))  # noqa: E731
                elif method == "torch_pruning":
                    fn = lambda: run_torch_pruning(model, x, budget)  # noqa: E731
                elif method == "uniform":
                    fn = lambda: run_baseline(model, x, budget, [b for b, _ in train[:20]])  # noqa: E731
                else:
                    fn = lambda: run_baseline(model, x, budget, [b for b, _ in train[:20]], ours_widths[pct])  # noqa: E731
                (pruned, extra), wall, cpu = timed(fn)
                if method == "ours":
                    ours_widths[pct] = extra["widths"]
                counts = ours_flops(pruned, x)
                row = {**base, "budget_percent": pct, "method": method, "search_seconds": wall, "search_cpu_seconds": cpu,
                       "score_calls": score.calls, "flops": counts["flops"], "flops_torchprofile": torchprofile_flops(pruned, x),
                       "params": sum(p.numel() for p in pruned.parameters()), "accuracy_pruned": fmnist.accuracy(pruned, test), **extra}
                row["flops_percent"] = 100 * row["flops"] / base["original_flops"]
                row["flops_percent_torchprofile"] = 100 * row["flops_torchprofile"] / base["original_flops_torchprofile"]
                row["over_budget"] = (row["flops_torchprofile"] if method == "modelopt" else row["flops"]) > budget * (1 + 1e-9)
                torch.manual_seed(0)
                fmnist.fit(pruned, finetune, args.finetune_steps / len(finetune), lr=0.01, teacher=teacher, log_every=0)
                row["accuracy_finetuned"] = fmnist.accuracy(pruned, test)
                print(f"{name} {pct:.0f}% {method:14s} flops {row['flops_percent']:.1f}% (tp {row['flops_percent_torchprofile']:.1f}%) "
                      f"params {100 * row['params'] / base['original_params']:.1f}%  acc {row['accuracy_pruned']:.4f} -> "
                      f"{row['accuracy_finetuned']:.4f}  search {wall:.0f} s ({cpu:.0f} s CPU), {score.calls} score calls", flush=True)
                rows.append(row)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(args.out).with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"finetune_steps": args.finetune_steps, "score_images": args.score_images,
                                           "divisor": DIVISOR, "rows": rows}, indent=1, default=str))
                os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
