"""Prune a pretrained vision model with FastNAS, fine-tune it (optionally distilling from the original), evaluate.

    python examples/fastnas_finetune.py                                  # Fashion-MNIST ResNet, 50% of the FLOPs
    python examples/fastnas_finetune.py --model mobilenetv2 --params 40% --steps 400 --distill --out outputs/mbv2
    python examples/fastnas_finetune.py --flops 30% --plot outputs/candidates.png

The pretrained nets are the Fashion-MNIST ResNet and MobileNetV2-style models of benchmarks/fastnas/fmnist.py
(weights committed in benchmarks/fastnas/weights; images from the Debian package dataset-fashion-mnist, which
scripts/setup_env.sh unpacks). For your own model, replace `load()`: any `nn.Module` torch.fx can trace, a
`score_func(model) -> float` (higher is better) on held-out data, and batches for BatchNorm recalibration.

Steps: test accuracy of the original -> FastNAS search under the budget (score = accuracy on held-out training
images; every subnet it scores has its BatchNorm statistics recalibrated) -> test accuracy right after pruning ->
SGD fine-tune (cross-entropy, plus KL to the original's logits with --distill) -> test accuracy again -> save one
file that `fastnas.restore(build_original(), path)` loads. Ctrl-C during the search loses nothing: rerun with the
same --out and it resumes from the checkpointed scores.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fastnas"))
import fmnist  # noqa: E402

from megatron_prune import fastnas  # noqa: E402


def load(name: str):
    """(pretrained model, calibration batches, score batches, fine-tuning batches, test batches)."""
    (xtr, ytr), (xte, yte) = fmnist.load_fmnist()
    hold = len(xtr) - 5000
    return (fmnist.pretrained(name), fmnist.batches(xtr[:hold], ytr[:hold], 64, shuffle_seed=1),
            fmnist.batches(xtr[hold:hold + 1000], ytr[hold:hold + 1000], 500),
            fmnist.batches(xtr[:hold], ytr[:hold], 128, shuffle_seed=2), fmnist.batches(xte, yte, 1000))


def plot(result, space, path: str) -> None:
    """Score against FLOPs share: every single-group subnet of the sensitivity pass (score predicted from the
    measured sensitivities), the scored candidates, the result, the original, and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    total = result.original_counts["flops"]
    share = lambda widths: 100 * space.count({**space.full, **widths})["flops"] / total  # noqa: E731
    points = [(share({g: w}), result.original_score - loss) for g, curve in result.penalties.items() for w, loss in curve.items()]
    ax.scatter(*zip(*points), s=8, color="lightgray", label="one group narrowed (sensitivity curves)")
    for c in result.candidates:
        ax.scatter(100 * c.counts["flops"] / total, c.score, s=40, label=f"candidate: {c.selector}")
    ax.scatter(100 * result.counts["flops"] / total, result.score, marker="D", s=70, facecolors="none",
               edgecolors="k", label="result")
    ax.scatter(100, result.original_score, marker="*", s=140, color="k", label="original")
    if "flops" in result.limits:
        ax.axvline(100 * result.limits["flops"] / total, ls="--", color="gray", label="FLOPs budget")
    ax.set_xlabel("FLOPs, % of the original")
    ax.set_ylabel("score (held-out accuracy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", choices=list(fmnist.MODELS))
    p.add_argument("--flops", default=None, help='FLOPs budget: a number or a percent of the original, e.g. "50%%"')
    p.add_argument("--params", default=None, help='parameter budget: a number or a percent, e.g. "40%%"')
    p.add_argument("--divisor", type=int, default=16, help="channel multiple (the default 32 cannot prune 32-wide groups)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batches of 128)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--distill", action="store_true", help="add KL to the original model's logits to the loss")
    p.add_argument("--out", default="outputs/fastnas", help="folder for the search checkpoint and the pruned model")
    p.add_argument("--plot", default=None, help="write a PNG of the scored candidates (needs matplotlib)")
    args = p.parse_args(argv)
    constraints = {k: v for k, v in (("flops", args.flops), ("params", args.params)) if v is not None} or {"flops": "50%"}

    torch.manual_seed(0)
    model, calib, score_batches, train, test = load(args.model)
    dummy = torch.randn(1, *calib[0][0].shape[1:])
    print(f"original: test accuracy {fmnist.accuracy(model, test):.4f}")
    space = fastnas.profile(model, dummy, constraints, config={"rules": {"*": {"divisor": args.divisor}}})

    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    pruned, result = fastnas.prune(model, constraints=constraints, dummy_input=dummy, data_loader=calib,
                                   score_func=lambda m: fmnist.accuracy(m, score_batches),
                                   checkpoint=os.path.join(args.out, "search.pt"),
                                   config={"rules": {"*": {"divisor": args.divisor}}})
    print(result.table())
    print(f"search: {time.time() - start:.0f} s; pruned: test accuracy {fmnist.accuracy(pruned, test):.4f}")
    if args.plot:
        plot(result, space, args.plot)

    fmnist.fit(pruned, train, args.steps / len(train), lr=args.lr, teacher=model if args.distill else None,
               log_every=max(1, args.steps // 5), label="fine-tune")
    print(f"fine-tuned ({args.steps} steps{', distilled' if args.distill else ''}): test accuracy "
          f"{fmnist.accuracy(pruned, test):.4f}")
    path = os.path.join(args.out, "pruned.pt")
    fastnas.save(pruned, path, result)
    print(f"saved {path}: fastnas.restore(fmnist.MODELS[{args.model!r}](), {path!r}) rebuilds it")


if __name__ == "__main__":
    main()
