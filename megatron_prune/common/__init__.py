"""What FastNAS and GradNAS share: width choices, the cost model, the budget solver, slicing, search
checkpoints and the pruned-model file. Budgets (`megatron_prune.common.budgets`) and errors (`megatron_prune.errors`)
are shared with Minitron too."""
