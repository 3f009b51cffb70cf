"""prune -> distill -> evaluate (optionally in several steps) as one NeMo-Run experiment.

    python launch/nemo_run/experiment.py --hf-model M --work-dir W --target '{"ffn_hidden_size": 1024}'
    python launch/nemo_run/experiment.py --hf-model M --work-dir W --target-params 50% --steps 2    # iterative
    python launch/nemo_run/experiment.py ... --slurm-account A --slurm-partition P --container-image IMG  # on Slurm

The plan (which command, which paths, each step's target) is launch/pipeline.py's; this file maps every command
to a `run.Script` (`python -m megatron_prune ...`, or launch/bridge_distill.py for Megatron-Bridge) and an
executor, and adds them in order to one `run.Experiment` run with `sequential=True`. Each task finds its input
by path: distill reads the run card the prune wrote (W/step{k}/pruned/distillation_run_card.yaml), evaluate and
the next prune read the distilled HF folder (W/step{k}/distilled/hf).

Executors: `local_executor` (default) runs each task under torchrun on this machine (`LocalExecutor`,
`launcher="torchrun"`); `slurm_executor` submits to a Slurm cluster (sbatch with the container image, torchrun
on every node; tasks chained with `afterok` dependencies). NeMo-Run's local sequential mode does not stop after a
failed task: the tasks after it fail at their input check within seconds, and this script exits non-zero.
NeMo-Run's own files (job logs, configs) go to W/nemo_run unless NEMORUN_HOME / --nemo-run-dir say otherwise.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # launch/: pipeline.py
import pipeline  # noqa: E402
from pipeline import Command, Plan  # noqa: E402


def task(cmd: Command):
    """The NeMo-Run task of one command: `python -m MODULE ARGS` or `python SCRIPT ARGS` (the launcher adds torchrun)."""
    import nemo_run as run

    if cmd.module:
        return run.Script(path=cmd.module, m=True, entrypoint="python", args=list(cmd.args))
    return run.Script(path=cmd.script, entrypoint="python", args=list(cmd.args))


def local_executor(ntasks_per_node: int = 1, env: Optional[Dict[str, str]] = None):
    """This machine, each task under torchrun with `ntasks_per_node` processes. The interpreter running this file
    goes first on PATH, so `torchrun` and `python` are the ones of its environment (e.g. the repo's .venv)."""
    import nemo_run as run

    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun", env_vars={"PATH": path, **(env or {})})


def slurm_executor(account: str, partition: str, container_image: str, nodes: int = 1, gpus_per_node: int = 8,
                   time: str = "04:00:00", container_mounts: Optional[List[str]] = None, host: Optional[str] = None,
                   user: Optional[str] = None, job_dir: str = "/lustre/nemo_run", env: Optional[Dict[str, str]] = None):  # fmt: skip
    """A Slurm cluster: `nodes` x `gpus_per_node` GPUs, torchrun on every node (one Slurm task per node spawning one
    process per GPU) inside `container_image` (the Dockerfile's image, megatron-prune installed), with
    `container_mounts` ("/lustre/models:/models") for models, data and outputs. Submits over SSH to `host` as `user`
    (job files under `job_dir` on the cluster), or from a login node when `host` is None."""
    import nemo_run as run

    tunnel = run.SSHTunnel(host=host, user=user, job_dir=job_dir) if host else run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=1, gpus_per_node=gpus_per_node,
        time=time, container_image=container_image, container_mounts=list(container_mounts or []),
        exclusive=True, launcher="torchrun", tunnel=tunnel, packager=run.Packager(),  # the code is in the image
        env_vars={"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", **(env or {})},
    )  # fmt: skip


def executor_for(cmd: Command, base=None):
    """The executor of one command: a clone of `base` (a Slurm executor) or a local torchrun executor sized to it."""
    if base is None:
        return local_executor(cmd.nproc)
    executor = base.clone()
    if cmd.kind == "evaluate":  # one process is enough to score the distilled student
        executor.nodes, executor.gpus_per_node = 1, 1
    return executor


def add_tasks(exp, plan: Plan, executor=None) -> None:
    """Add the plan's tasks, in order, to `exp` (inside its `with` block; run it with `exp.run(sequential=True)`)."""
    for cmd in plan.commands:
        exp.add(task(cmd), executor=executor_for(cmd, executor), name=cmd.name)


def run_experiment(plan: Plan, title: str = "megatron-prune", base_dir: Optional[str] = None, executor=None,
                   detach: bool = False) -> Tuple[Dict[str, str], str, str]:  # fmt: skip
    """Run the plan as one experiment, tasks one after the other; returns ({task: status name}, experiment id,
    experiment directory). NeMo-Run's own closing hints are off: its `nemo experiment status` line omits the
    NEMORUN_HOME this script chose, so it cannot find the run (`inspect_command` is the working one)."""
    import nemo_run as run

    with run.Experiment(title, base_dir=base_dir, log_level="WARN", enable_goodbye_message=False) as exp:
        add_tasks(exp, plan, executor)
        exp.run(sequential=True, detach=detach)
        statuses = exp.status(return_dict=True) or {}
    return {name: str(info["status"]).split()[0] for name, info in statuses.items()}, exp._id, exp._exp_dir


def task_log(exp_dir: str, name: str) -> Optional[str]:
    """The full path of a local task's log (stdout and stderr of its processes), if NeMo-Run wrote one."""
    logs = sorted(Path(exp_dir, name).rglob("combined.log")) or sorted(Path(exp_dir, name).rglob("stdout.log"))
    return str(logs[0]) if logs else None


def inspect_command(base_dir: str, exp_id: str) -> str:
    """The NeMo-Run CLI command that finds this experiment again (its records live under `base_dir`)."""
    return f"NEMORUN_HOME={shlex.quote(base_dir)} nemo experiment status {exp_id}"


def build_parser():
    p = pipeline.build_parser(__doc__)
    n = p.add_argument_group("NeMo-Run")
    n.add_argument("--title", default="megatron-prune", help="experiment title")
    n.add_argument("--nemo-run-dir", default=None, help="experiment logs and configs (default: NEMORUN_HOME, else W/nemo_run)")
    s = p.add_argument_group("NeMo-Run on Slurm (account, partition and image together select the Slurm executor)")
    s.add_argument("--slurm-account", default=None)
    s.add_argument("--slurm-partition", default=None)
    s.add_argument("--container-image", default=None, help="e.g. your registry's build of this repo's Dockerfile")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--time", default="04:00:00")
    s.add_argument("--container-mounts", nargs="*", default=[], help="host:container paths (models, data, W)")
    s.add_argument("--ssh-host", default=None, help="submit over SSH (default: sbatch on this login node)")
    s.add_argument("--ssh-user", default=None)
    s.add_argument("--cluster-job-dir", default="/lustre/nemo_run", help="NeMo-Run job files on the cluster")
    s.add_argument("--detach", action="store_true", help="Slurm: return after submitting")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = pipeline.plan_from_args(args)
    except (pipeline.PipelineError, ValueError) as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 2
    slurm = [args.slurm_account, args.slurm_partition, args.container_image]
    if any(slurm) and not all(slurm):
        print("experiment: error: Slurm needs --slurm-account, --slurm-partition and --container-image", file=sys.stderr)
        return 2
    if args.dry_run:
        for cmd in plan.commands:
            print(f"{cmd.name}: torchrun x{cmd.nproc}: {' '.join(task(cmd).to_command(with_entrypoint=True))}")
        return 0
    base_dir = args.nemo_run_dir or os.environ.get("NEMORUN_HOME") or str(Path(plan.work_dir) / "nemo_run")
    os.environ.setdefault("NEMORUN_HOME", base_dir)  # read when nemo_run is first imported (its job registry)
    executor = None
    if all(slurm):
        executor = slurm_executor(args.slurm_account, args.slurm_partition, args.container_image, args.nodes,
                                  args.gpus_per_node, args.time, args.container_mounts, args.ssh_host, args.ssh_user,
                                  args.cluster_job_dir)  # fmt: skip
    Path(plan.work_dir).mkdir(parents=True, exist_ok=True)
    statuses, exp_id, exp_dir = run_experiment(plan, args.title, base_dir, executor, detach=args.detach)
    logs = {c.name: task_log(exp_dir, c.name) for c in plan.commands} if executor is None else {}
    print(flush=True)  # NeMo-Run's status panel ends without a newline
    for c in plan.commands:
        print(f"[experiment] {c.name}: {statuses.get(c.name)}" + (f" (log: {logs[c.name]})" if logs.get(c.name) else ""))
    print(f"[experiment] inspect it later with: {inspect_command(base_dir, exp_id)}")
    failed = [c.name for c in plan.commands if statuses.get(c.name) != "SUCCEEDED"]
    if executor is None and failed:
        where = logs.get(failed[0]) or os.path.join(exp_dir, failed[0])
        print(f"experiment: error: {failed[0]} did not succeed (its log: {where})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
