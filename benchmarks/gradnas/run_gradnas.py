"""GradNAS side by side, in one run.

MiniLM (all-MiniLM-L6-v2 fine-tuned on a 5-source passage classification task, textcls.py) at 70% params and
60% FLOPs: megatron-prune's GradNAS (default greedy; with a validation score_func over the three selectors; with
uniform=True), Model Optimizer 0.44.0's GradNAS (in a subprocess with 0.44.0 first on PYTHONPATH; raw loss and
loss x 1000), and uniform width with gradient-ranked, magnitude-ranked and random units. Every method gets the
same model, gradient batches and budget; afterwards the same short fine-tune (cross-entropy + distillation from
the unpruned classifier). Reported: params and FLOPs (megatron-prune's counter, measured on the pruned model),
test accuracy after pruning and after the fine-tune, wall and CPU time of the pruning call.

SmolLM2-135M at the parameter count of this project's Minitron runs (benchmarks/quality): GradNAS with
next-token loss on the same calibration text as Minitron (the packaged Jargon File excerpt, 64 x 256 tokens),
held-out perplexity on the same windows (8 x 512 tokens of the Python docs and of Shakespeare). The Minitron
rows are read from benchmarks/results/quality*.json (same model, same evaluation windows; the unpruned
perplexity is recomputed here and must match).

    .venv/bin/python benchmarks/gradnas/run_gradnas.py                # about 45 min on 2 busy CPU cores
    .venv/bin/python benchmarks/gradnas/run_gradnas.py --parts minilm --finetune-steps 4 --grad-batches 4   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import textcls  # noqa: E402

from megatron_prune import gradnas  # noqa: E402
from megatron_prune.common import solver  # noqa: E402
from megatron_prune.gradnas import export  # noqa: E402
from megatron_prune.gradnas.search import group_scores, penalty_curves  # noqa: E402
from megatron_prune.gradnas.space import build_space  # noqa: E402

RESULTS = REPO / "benchmarks/results/gradnas.json"
BUDGETS = ({"params": "70%"}, {"flops": "60%"})
MODELOPT = ("nvidia-modelopt==0.44.0", "torchprofile==0.0.4")
# SmolLM2: (params, uniform) at Minitron's counts: heads 9->6 + FFN 1536->1024 (75.3%), and the NAS winner (72.4%)
SMOL_TARGETS = ((101_337_408, False), (101_337_408, True), (97_351_488, False))


def timed(fn):
    """(result, wall seconds, CPU seconds of this process and its children)."""
    def cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    start, start_cpu = time.time(), cpu()
    out = fn()
    return out, time.time() - start, cpu() - start_cpu


def modelopt_dir() -> Path:
    """Model Optimizer 0.44.0 and torchprofile 0.0.4, installed (no deps) into the cache once."""
    from megatron_prune.minitron.bridge.offline_model import cache_dir

    target = cache_dir() / "modelopt-0.44.0"
    if not (target / "modelopt").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *MODELOPT], check=True)
    return target


# --------------------------------------------------------------------------------------------- baselines
def uniform_widths(space, limits):
    """The same ratio of every head and FFN group (the widest choice at or below r x full), largest r that fits."""
    def at(r):
        return {g: max([w for w in c if w <= r * c[-1]] or [c[0]]) for g, c in space.choices.items()}

    ratios = sorted({w / c[-1] for c in space.choices.values() for w in c}, reverse=True)
    return next(at(r) for r in ratios if solver.fits(space.count, at(r), limits))


def magnitude_scores(model, space):
    """Per unit: the L2 norm of every weight slice it owns (its rows of Q/K/V or up, its columns of the output or
    down projection)."""
    out = {g: torch.zeros(grp.units, dtype=torch.float64) for g, grp in space.groups.items()}
    for (module, attr), dims in space.tensors.items():
        if attr != "weight":
            continue
        weight = getattr(model.get_submodule(module), attr).detach().double()
        for dim, extent in dims.items():
            for g in extent.groups:
                out[g] += extent.unit_view(weight.pow(2), dim, g).reshape(space.groups[g].units, -1).sum(1)
    return {g: s.sqrt() for g, s in out.items()}


def random_scores(space, seed):
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.rand(grp.units, generator=gen, dtype=torch.float64) for g, grp in space.groups.items()}


# --------------------------------------------------------------------------------------------- MiniLM
def run_minilm(args):
    data = textcls.load_task()
    model, tokenizer = textcls.finetuned_minilm(data)
    grad_batches = textcls.encode(tokenizer, data["train"][:16 * args.grad_batches], 16)
    val, test = textcls.encode(tokenizer, data["val"], 64), textcls.encode(tokenizer, data["test"], 64)
    tune = textcls.encode(tokenizer, data["train"], 32)
    dummy = grad_batches[0]["input_ids"][:1]                     # FLOPs at batch 1 x 64 tokens
    base_acc = textcls.accuracy(model, test)
    space = build_space(model, dummy)
    print(f"MiniLM: test accuracy {base_acc:.4f}, {space.count()}", flush=True)
    rows = [{"budget": "-", "method": "unpruned", **space.count(), "acc_pruned": base_acc}]
    mo = modelopt_dir()
    batches_file = RESULTS.parent / ".gradnas_minilm_batches.pt"
    torch.save(grad_batches, batches_file)
    folder = str(next(textcls.cache_dir().glob(f"gradnas-minilm-textcls-{len(data['train'])}-*")))
    try:
        for budget in BUDGETS:
            rows += minilm_budget(args, model, space, budget, grad_batches, val, test, tune, dummy, mo, batches_file, folder)
    finally:
        batches_file.unlink(missing_ok=True)
    return {"model": "all-MiniLM-L6-v2 + 5-way classifier", "task": "source of a 32-word passage (textcls.py)",
            "train": len(data["train"]), "val": len(data["val"]), "test": len(data["test"]),
            "gradient_batches": f"{len(grad_batches)} x 16 passages", "dummy_input": "1 x 64 tokens",
            "finetune": f"{args.finetune_steps} steps x 32 passages, AdamW lr {args.lr}, CE + KL to the unpruned model",
            "rows": rows}


def minilm_budget(args, model, space, budget, grad_batches, val, test, tune, dummy, mo, batches_file, folder):
    label = ", ".join(f"{k} {v}" for k, v in budget.items())
    limits = gradnas.api.check_limits(space, budget)
    out = []

    def record(method, pruned, seconds=None, cpu=None, **extra):
        counts = gradnas.count(pruned, dummy)
        row = {"budget": label, "method": method, **counts, **{f"{m}_share": counts[m] / space.count()[m] for m in counts},
               "within_budget": all(counts[m] <= lim for m, lim in limits.items()),
               "acc_pruned": textcls.accuracy(pruned, test), "wall_s": seconds, "cpu_s": cpu, **extra}
        tuned = copy.deepcopy(pruned)
        row["finetune_losses"] = textcls.train(tuned, tune, args.finetune_steps, args.lr, teacher=model)[-3:]
        row["acc_finetuned"] = textcls.accuracy(tuned, test)
        print(json.dumps({k: v for k, v in row.items() if k != "finetune_losses"}), flush=True)
        out.append(row)

    common = dict(constraints=budget, dummy_input=dummy, data_loader=grad_batches, verbose=False)
    ckpt = RESULTS.parent / f".gradnas_minilm_{label.replace(' ', '').replace('%', '')}.pt"
    ckpt.unlink(missing_ok=True)
    (pruned, result), wall, cpu = timed(lambda: gradnas.prune(model, checkpoint=ckpt, **common))
    record("megatron-prune GradNAS (greedy)", pruned, wall, cpu, widths=result.widths)
    gradient_wall, gradient_cpu = wall, cpu
    score = lambda m: textcls.accuracy(m, val)  # noqa: E731
    (pruned, scored), wall, cpu = timed(lambda: gradnas.prune(model, checkpoint=ckpt, score_func=score, **common))
    record("megatron-prune GradNAS + score_func (val accuracy, 3 selectors)", pruned, gradient_wall + wall, gradient_cpu + cpu,
           selector=scored.selector, widths=scored.widths, note="gradients reused from the greedy run; its time added")
    (pruned, uni), wall, cpu = timed(lambda: gradnas.prune(model, checkpoint=ckpt, uniform=True, **common))
    record("megatron-prune GradNAS uniform=True", pruned, gradient_wall + wall, gradient_cpu + cpu, widths=uni.widths,
           hf_loadable=uni.hf_loadable, note="gradients reused from the greedy run; its time added")
    ckpt.unlink(missing_ok=True)
    for scale in args.mo_scales:
        key, value = next(iter(budget.items()))
        out_file = RESULTS.parent / ".gradnas_modelopt_out.pt"
        env = {**os.environ, "PYTHONPATH": str(mo)}
        cmd = [sys.executable, str(HERE / "modelopt_gradnas.py"), folder, str(batches_file), str(out_file),
               "--constraint", f"{key}={value}", "--loss-scale", str(scale)]
        _, wall, cpu = timed(lambda: subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        mo_out = torch.load(out_file)
        out_file.unlink()
        pruned = load_state_into(model, space, mo_out["state_dict"])
        record(f"Model Optimizer 0.44.0 GradNAS{' (loss x %g)' % scale if scale != 1 else ''}", pruned, mo_out["seconds"], cpu,
               modelopt_counts=mo_out["constraints"], modelopt_satisfied=mo_out["is_satisfied"],
               subprocess_wall_s=wall, widths=widths_of(space, mo_out["state_dict"]))
    scores = {s: torch.tensor(v, dtype=torch.float64) for s, v in result.scores.items()}
    widths = uniform_widths(space, limits)
    for method, unit_scores in [("uniform width, gradient-ranked units", group_scores(space, scores)),
                                ("uniform width, weight-magnitude units", magnitude_scores(model, space))]:
        record(method, export.build(model, space, unit_scores, widths)[0], widths=widths)
    for seed in range(args.random_seeds):
        record(f"uniform width, random units (seed {seed})", export.build(model, space, random_scores(space, seed), widths)[0],
               widths=widths)
    penalties = penalty_curves(space, group_scores(space, scores))
    for row in out:
        row["predicted_loss"] = solver.predicted_loss(penalties, {v: row["widths"][gs[0]] for v, gs in space.variables.items()})
    return out


def widths_of(space, state_dict):
    """Per-layer widths of a pruned BERT state dict (heads from the query rows, FFN from the intermediate rows)."""
    widths = {}
    for layer in space.layers:
        p, i = layer.prefix, layer.index
        widths[f"layers.{i}.heads"] = state_dict[f"{p}.attention.self.query.weight"].shape[0] // layer.sizes.head_dim
        widths[f"layers.{i}.ffn"] = state_dict[f"{p}.intermediate.dense.weight"].shape[0]
    return widths


def load_state_into(model, space, state_dict):
    """Model Optimizer's pruned weights in megatron-prune's build of the same per-layer sizes (strict load)."""
    zeros = {g: torch.zeros(grp.units, dtype=torch.float64) for g, grp in space.groups.items()}
    pruned = export.build(model, space, zeros, widths_of(space, state_dict))[0]
    pruned.load_state_dict(state_dict, strict=True)
    return pruned.eval()


# --------------------------------------------------------------------------------------------- SmolLM2
def run_smollm2(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks/quality"))
    from heldout import heldout_sources

    from megatron_prune.minitron.bridge.offline_model import smollm2_folder
    from megatron_prune.minitron.data.calibration import calibration_tokens, micro_batches

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calib = micro_batches(calibration_tokens("default", tokenizer, args.smol_samples, 256, seed=1234), 4)
    batches = [{"input_ids": t, "labels": t} for t in calib]
    evals = {name: calibration_tokens(path, tokenizer, args.windows, 512, seed=0) for name, path in heldout_sources().items()}

    @torch.no_grad()
    def perplexity(m):
        out = {}
        for name, rows in evals.items():
            total = count = 0.0
            for row in rows:
                logits = m(input_ids=row[None]).logits[0, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
                count += row.numel() - 1
            out[name] = round(math.exp(total / count), 2)
        return out

    dummy = calib[0][:1]  # 1 x 256 tokens
    minitron = minitron_rows()
    assert {r["params"] for r in minitron} >= {p for p, _ in SMOL_TARGETS}, "the Minitron result files lack a target"
    rows = [{"method": "unpruned", "params": sum(p.numel() for p in model.parameters()), **perplexity(model)}]
    print(json.dumps(rows[-1]), flush=True)
    ckpt = RESULTS.parent / ".gradnas_smollm2.pt"
    ckpt.unlink(missing_ok=True)
    for params, uniform in SMOL_TARGETS:
        run = lambda: gradnas.prune(model, constraints={"params": params}, dummy_input=dummy,  # noqa: E731
                                    data_loader=batches, checkpoint=ckpt, uniform=uniform, verbose=True)
        (pruned, result), wall, cpu = timed(run)
        heads = [w for g, w in result.widths.items() if g.endswith("heads")]
        ffn = [w for g, w in result.widths.items() if g.endswith("ffn")]
        rows.append({"method": f"megatron-prune GradNAS{' uniform=True' if uniform else ''}", "target_params": params,
                     "params": int(result.counts["params"]), **perplexity(pruned), "wall_s": wall, "cpu_s": cpu,
                     "gradient_batches_reused": result.reused_batches, "heads_per_layer": heads, "ffn_per_layer": ffn,
                     "hf_loadable": result.hf_loadable})
        print(json.dumps(rows[-1]), flush=True)
        del pruned
    ckpt.unlink(missing_ok=True)
    return {"model": "SmolLM2-135M-Instruct (HF, float32)", "gradients": f"{len(batches)} x 4 x 256 tokens of the Jargon File "
            "excerpt (Minitron's calibration rows)", "eval": f"{args.windows} windows x 512 tokens per text",
            "rows": rows, "minitron_rows": minitron}


def minitron_rows():
    """Minitron rows at under 80% of SmolLM2's parameters, from the quality benchmark's result files."""
    rows = []
    for name in ("quality_criteria.json", "quality_nas.json"):
        path = REPO / "benchmarks/results" / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for r in data.get("rows", []):
            if r.get("params") and r["params"] < 0.8 * 134515008 and "random" not in r.get("method", ""):
                rows.append({"source": name, **{k: r[k] for k in ("target", "method", "params", "python_docs", "shakespeare") if k in r}})
        if "winner" in data:
            w = data["winner"]
            rows.append({"source": name, "target": "NAS winner (params <= 100M)", "method": "minitron NAS",
                         **{k: w[k] for k in ("params", "python_docs", "shakespeare") if k in w}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["minilm", "smollm2"])
    p.add_argument("--grad-batches", type=int, default=32, help="MiniLM gradient batches of 16 passages")
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--random-seeds", type=int, default=2)
    p.add_argument("--mo-scales", type=float, nargs="*", default=[1.0, 1000.0])
    p.add_argument("--smol-samples", type=int, default=64, help="SmolLM2 gradient rows of 256 tokens")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.manual_seed(0)
    out, start = {}, time.time()
    if "minilm" in args.parts:
        out["minilm"] = run_minilm(args)
    if "smollm2" in args.parts:
        out["smollm2"] = run_smollm2(args)
    out["wall_time_s"] = round(time.time() - start)
    out["machine"] = f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
