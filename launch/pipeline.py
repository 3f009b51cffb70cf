"""prune -> distill -> evaluate, once or in steps (iterative pruning), as a plan of commands.

launch/nemo_run/experiment.py turns the plan into one NeMo-Run experiment; this file also runs it directly,
one command after the other (no NeMo-Run needed), stopping at the first failure:

    python launch/pipeline.py --hf-model M --work-dir W --target '{"ffn_hidden_size": 1024, "num_layers": 24}'
    python launch/pipeline.py --hf-model M --work-dir W --target-params 50% --steps 2        # NAS budget per step
    python launch/pipeline.py ... --step-targets '[{"num_layers": 28}, {"num_layers": 24}]'   # explicit steps
    python launch/pipeline.py ... --dry-run                                                  # print the commands

The work directory, for steps k = 1..N:
    W/step{k}/pruned/      megatron-prune's output: hf/, megatron/, distillation_run_card.yaml, prune_summary.json
    W/step{k}/distilled/   the distillation's output; distilled/hf/ is step k+1's --hf-model
    W/step{k}/eval.json    held-out perplexity of the distilled student
    W/pipeline.json        the plan, and (direct runs) the perplexities
Step k prunes the model distilled at step k-1 (the original at step 1); its run card names that model as the
teacher, so every step distils from the one before, as the Minitron guidelines recommend beyond ~50% compression.
With --steps N, a final `--target` is reached through evenly spaced sizes, a `--target-params` budget through a
geometric sequence of budgets (each step keeps the same fraction of its input's parameters).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from megatron_prune.minitron import axes

LAUNCH_DIR = Path(__file__).resolve().parent
Target = Union[Dict[str, int], str]  # an export config, or a NAS parameter budget such as "80M"
# axes that move a little at every step; the others (KV groups, MoE experts) move at the last step
_WIDTH = ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


class PipelineError(ValueError):
    """A pipeline that cannot be planned; the message names the flag."""


@dataclass
class Command:
    """One step of the plan: `python -m module args` (or `python script args`) on `nproc` local processes."""

    name: str  # prune1, distill1, evaluate1, prune2, ...
    kind: str  # prune | distill | evaluate
    args: List[str]
    module: Optional[str] = None
    script: Optional[str] = None
    nproc: int = 1
    output: str = ""  # exists once the command has succeeded

    def argv(self, python: str = sys.executable, torchrun: bool = False) -> List[str]:
        """The command line; torchrun=True (or nproc > 1) runs it under torchrun on this node."""
        target = ["-m", self.module] if self.module else [self.script]
        if torchrun or self.nproc > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.nproc), *target, *self.args]
        return [python, *target, *self.args]


@dataclass
class Plan:
    hf_model: str
    work_dir: str
    targets: List[Target]
    commands: List[Command] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"hf_model": self.hf_model, "work_dir": self.work_dir, "targets": self.targets,
                "commands": [asdict(c) for c in self.commands]}  # fmt: skip


def hf_sizes(hf_model: str) -> Dict[str, int]:
    """The sizes (TransformerConfig names) in an HF folder's config.json."""
    path = Path(hf_model) / "config.json"
    if not path.is_file():
        raise PipelineError(f"--hf-model {hf_model!r}: no config.json (stepping to a target needs the model's sizes)")
    config = json.loads(path.read_text())
    return {axis: config[hf] for hf, axis in axes.hf_sizes().items() if isinstance(config.get(hf), int)}


def hf_params(hf_model: str) -> int:
    """Parameters of an HF causal LM, counted on the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def size_steps(original: Dict[str, int], final: Dict[str, int], steps: int) -> List[Dict[str, int]]:
    """Export configs for `steps` prunes from `original` sizes to `final` (each step's config is absolute).

    Widths and depth move evenly (widths rounded to multiples of 64, or of 8 below 1024); attention heads move
    evenly in multiples of the step's KV groups; KV groups and MoE sizes move at the last step."""
    unknown = sorted(set(final) - set(original))
    if unknown:
        raise PipelineError(f"--target axes {unknown} are not in the model's config ({sorted(original)})")
    for axis, size in final.items():
        if not isinstance(size, int) or not 1 <= size <= original[axis]:
            raise PipelineError(f"--target {axis}={size!r} must be an integer in 1..{original[axis]} (the model's size)")
    plans = []
    for k in range(1, steps + 1):
        last = k == steps
        config = {}
        for axis, end in final.items():
            start = original[axis]
            if last or start == end:
                config[axis] = end
                continue
            ideal = start + (end - start) * k / steps
            if axis in _WIDTH:
                multiple = 64 if min(start, end) >= 1024 else 8
            elif axis == "num_attention_heads":
                multiple = original.get("num_query_groups", 1)
            elif axis == "num_layers":
                multiple = 1
            else:
                config[axis] = start  # KV groups, experts: at the last step
                continue
            config[axis] = min(start, max(end, multiple * round(ideal / multiple)))
        plans.append(config)
    return plans


def budget_steps(params: int, final: float, steps: int) -> List[str]:
    """Parameter budgets for `steps` NAS prunes from `params` to `final`: a geometric sequence."""
    if not 0 < final < params:
        raise PipelineError(f"--target-params {final:,.0f} must be below the model's {params:,} parameters")
    return [str(int(params * (final / params) ** (k / steps))) for k in range(1, steps + 1)]


def plan_targets(args: argparse.Namespace) -> List[Target]:
    """Each step's target from --target / --target-params / --step-targets and --steps."""
    given = [name for name in ("target", "target_params", "step_targets") if getattr(args, name)]
    if len(given) != 1:
        raise PipelineError("give exactly one of --target (sizes), --target-params (a NAS budget) or --step-targets")
    if args.steps < 1:
        raise PipelineError(f"--steps {args.steps} must be >= 1")
    if args.step_targets:
        targets = json.loads(args.step_targets)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, (dict, str)) for t in targets):
            raise PipelineError("--step-targets must be a JSON list of export configs ({axis: size}) or budgets (\"80M\")")
        return targets
    if args.target:
        final = json.loads(args.target)
        if not isinstance(final, dict) or not final:
            raise PipelineError(f"--target must be a JSON object of axis: size, got {args.target!r}")
        if args.steps == 1 and not (Path(args.hf_model) / "config.json").is_file():
            return [final]  # a hub id: megatron-prune checks the sizes
        return size_steps(hf_sizes(args.hf_model), final, args.steps)
    from megatron_prune.common.budgets import is_percent, parse_budget
    from megatron_prune.errors import PruneConfigError
    from megatron_prune.minitron.search.args import budget_arg

    params = hf_params(args.hf_model) if (args.steps > 1 or is_percent(args.target_params)) else None
    try:  # "50%" of the parameters counted from the config (no weights read), or a count such as 350M
        final = parse_budget("--target-params", budget_arg(args.target_params), params)
    except (PruneConfigError, argparse.ArgumentTypeError) as e:
        raise PipelineError(str(e)) from None
    return budget_steps(params, final, args.steps) if args.steps > 1 else [str(int(final))]


def cpu_distill_flags(distill_args: Sequence[str], max_positions: Optional[int] = None) -> List[str]:
    """A CPU-sized recipe for the CPU distillation loop, for each flag `distill_args` does not set itself: the run
    card's recipe is the GPU guideline (global batch 768 of 4096 tokens, 100 warm-up steps of ~25k), which a CPU
    loop cannot run. Sequence length 256 (at most `max_positions`)."""
    args = list(distill_args)
    given = {a.split("=", 1)[0] for a in args}
    iters = int(args[args.index("--train-iters") + 1]) if "--train-iters" in args[:-1] else 100
    defaults = {"--train-iters": str(iters), "--lr-warmup-iters": str(iters // 10), "--global-batch-size": "8",
                "--micro-batch-size": "2", "--seq-length": str(min(256, max_positions or 256))}  # fmt: skip
    if "--train-tokens" in given:  # a token budget sets the length instead (and the card's warm-up stays)
        defaults.pop("--train-iters")
        defaults.pop("--lr-warmup-iters")
    return [x for flag, value in defaults.items() if flag not in given for x in (flag, value)]


def target_flags(export_config: Dict[str, int]) -> List[str]:
    """`--target-<axis> N` flags (no JSON: arguments stay free of spaces and quotes, which NeMo-Run's local torchrun
    launcher would pass on literally)."""
    return [x for axis, size in export_config.items() for x in (f"--target-{axis.replace('_', '-')}", str(size))]


def build_plan(hf_model: str, work_dir: str, targets: Sequence[Target], distill: str = "cpu", tp: int = 1, pp: int = 1,
               nproc: Optional[int] = None, distill_nproc: int = 1, prune_args: Sequence[str] = (),
               distill_args: Sequence[str] = (), eval_args: Sequence[str] = (), overwrite: bool = False) -> Plan:  # fmt: skip
    """The commands of len(targets) prune -> distill -> evaluate steps. `distill`: cpu (the CPU loop,
    `python -m megatron_prune.minitron.distill`, with a CPU-sized recipe unless `distill_args` set one: `cpu_distill_flags`)
    or bridge (Megatron-Bridge, launch/bridge_distill.py, on GPUs: the card's recipe)."""
    if distill not in ("cpu", "bridge"):
        raise PipelineError(f"--distill {distill!r}: cpu or bridge")
    work = Path(work_dir).absolute()
    plan = Plan(str(hf_model), str(work), list(targets))
    config = Path(hf_model) / "config.json"
    max_positions = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
    source = str(hf_model)
    again = ["--overwrite"] if overwrite else []
    for k, target in enumerate(targets, start=1):
        step = work / f"step{k}"
        pruned, distilled = step / "pruned", step / "distilled"
        card = pruned / "distillation_run_card.yaml"
        target_args = ["--target-params", target] if isinstance(target, str) else target_flags(target)
        plan.commands.append(Command(
            f"prune{k}", "prune", ["--hf-model", source, "--output-dir", str(pruned), *target_args,
                                   "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                                   *again, *prune_args],
            module="megatron_prune", nproc=nproc or tp * pp, output=str(card)))  # fmt: skip
        distill_cmd = ["--run-card", str(card), "--output-dir", str(distilled), *distill_args]
        if distill == "cpu":
            distill_cmd += cpu_distill_flags(distill_args, max_positions)
            plan.commands.append(Command(f"distill{k}", "distill", distill_cmd + again, module="megatron_prune.minitron.distill",
                                         output=str(distilled / "hf")))  # fmt: skip
        else:
            plan.commands.append(Command(f"distill{k}", "distill", distill_cmd, script=str(LAUNCH_DIR / "bridge_distill.py"),
                                         nproc=distill_nproc, output=str(distilled / "hf")))  # fmt: skip
        plan.commands.append(Command(f"evaluate{k}", "evaluate",
                                     ["--hf-model", str(distilled / "hf"), "--output", str(step / "eval.json"), *eval_args],
                                     module="megatron_prune.minitron.distill.evaluate", output=str(step / "eval.json")))  # fmt: skip
        source = str(distilled / "hf")
    return plan


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", required=True, help="the model to prune (HF folder; a hub id works without --steps)")
    p.add_argument("--work-dir", required=True, help="step{k}/pruned, step{k}/distilled, step{k}/eval.json go here")
    t = p.add_argument_group("targets (one of)")
    t.add_argument("--target", default=None, help='final sizes, JSON: \'{"ffn_hidden_size": 1024, "num_layers": 24}\'')
    t.add_argument("--target-params", default=None, help="final NAS parameter budget: 3B, 350M, or 50%% of the model")
    t.add_argument("--step-targets", default=None, help='JSON list, one per step: [{"num_layers": 28}, ...] or ["6B", "4B"]')
    t.add_argument("--steps", type=int, default=1, help="prune -> distill rounds to reach --target / --target-params")
    r = p.add_argument_group("how each step runs")
    r.add_argument("--distill", choices=("cpu", "bridge"), default=None,
                   help="cpu: python -m megatron_prune.minitron.distill; bridge: Megatron-Bridge (GPUs). Default: bridge with CUDA")
    r.add_argument("--tp", type=int, default=1, help="pruning tensor-parallel size")
    r.add_argument("--pp", type=int, default=1, help="pruning pipeline-parallel size")
    r.add_argument("--nproc-per-node", type=int, default=None, help="pruning processes (default TP x PP; more: DP)")
    r.add_argument("--distill-nproc-per-node", type=int, default=1, help="bridge distillation processes (GPUs)")
    r.add_argument("--prune-args", default="", help='extra megatron-prune flags, e.g. "--calib-data /data/c.jsonl"')
    r.add_argument("--distill-args", default="", help='extra distillation flags, e.g. "--train-iters 200"')
    r.add_argument("--eval-args", default="", help='extra evaluate flags, e.g. "--data /data/heldout.txt --samples 32"')
    r.add_argument("--overwrite", action="store_true", help="replace existing step outputs")
    r.add_argument("--dry-run", action="store_true", help="print the plan's commands and exit")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    distill = args.distill
    if distill is None:
        import torch

        distill = "bridge" if torch.cuda.is_available() else "cpu"
    return build_plan(args.hf_model, args.work_dir, plan_targets(args), distill, args.tp, args.pp, args.nproc_per_node,
                      args.distill_nproc_per_node, shlex.split(args.prune_args), shlex.split(args.distill_args),
                      shlex.split(args.eval_args), args.overwrite)  # fmt: skip


def run_plan(plan: Plan, python: str = sys.executable) -> dict:
    """Run every command in order on this machine; stop at the first failure. Returns the evaluations."""
    Path(plan.work_dir).mkdir(parents=True, exist_ok=True)
    results = {}
    for cmd in plan.commands:
        argv = cmd.argv(python, torchrun=cmd.script is not None)
        print(f"[pipeline] {cmd.name}: {shlex.join(argv)}", flush=True)
        if subprocess.run(argv).returncode != 0:
            raise SystemExit(f"[pipeline] {cmd.name} failed; later steps not run (outputs so far in {plan.work_dir})")
        if cmd.kind == "evaluate":
            results[cmd.name] = json.loads(Path(cmd.output).read_text())
    record = plan.to_dict() | {"evaluations": results}
    Path(plan.work_dir, "pipeline.json").write_text(json.dumps(record, indent=2))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except (PipelineError, json.JSONDecodeError, argparse.ArgumentTypeError) as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cmd in plan.commands:
            print(shlex.join(cmd.argv(torchrun=cmd.script is not None)))
        return 0
    for name, result in run_plan(plan).items():
        print(f"[pipeline] {name}: perplexity {result.get('perplexity')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
