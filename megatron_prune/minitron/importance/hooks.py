"""Hooks: route activations of MCore modules into the statistics, and nothing more.

Owns: *where* each statistic is observed (`LAYER_SITES`) and the hook lifecycle. The math lives in
statistics.py. Keys are ``layer{global_layer_number}/{site}``, so what a rank collects is independent of
how layers are spread over pipeline stages. A site is hooked in every layer that holds its module (an MoE
layer has a router and experts instead of `mlp.linear_fc1`/`linear_fc2`).

Sites, per decoder layer (MCore tensors are [S, B, C]; routed-expert tokens are [T, C]). `_in` sites are the
reference's Minitron activation statistics, `_out` sites the output contribution of a channel or group after
the linear it feeds (statistics.group_output_norms), `_taylor` sites first-order Taylor scores of a mask on it
(statistics.taylor_groups; collected only when the forward loop runs backward):
  qkv_in             normalised input of `self_attention.linear_qkv`    -> hidden_size                     [H]
  mla_in             the same for MLA's `linear_kv_down_proj`           -> hidden_size                     [H]
  fc1_in             normalised input of `mlp.linear_fc1`               -> hidden_size                     [H]
  router_in          input of the MoE `mlp.router` (pre_mlp_layernorm)  -> hidden_size                     [H]
  mamba_in           normalised input of a Mamba `mixer.in_proj`        -> hidden_size                     [H]
  proj_in            input of `self_attention.linear_proj`              -> num_attention_heads             [N*d]
                     (MLA: d is the value head dim v; its heads have no query groups, so no group site is hooked)
  proj_heads_out     each head's contribution after `linear_proj`       -> num_attention_heads             [N]
  proj_groups_out    each query group's contribution after it           -> num_query_groups                [G]
  proj_heads_taylor  Taylor score of a mask on each head at its input   -> num_attention_heads             [N]
  proj_groups_taylor the same for each query group                      -> num_query_groups                [G]
  fc2_in             input of `mlp.linear_fc2`                          -> ffn_hidden_size                 [F]
  fc2_out            each channel's contribution after `linear_fc2`     -> ffn_hidden_size                 [F]
  fc2_taylor         Taylor score of a mask on each FFN channel         -> ffn_hidden_size                 [F]
  shared_fc2_in/_out the same two for `mlp.shared_experts.linear_fc2`   -> moe_shared_expert_intermediate_size [Fs]
  expert_fc2_in/_out the same per routed expert's `linear_fc2` (row e)  -> moe_ffn_hidden_size             [E, Fm]
  experts            outputs of `mlp.experts`, split per expert         -> num_moe_experts                 [2, E]
  mamba_x            the x segment of `mixer.in_proj`'s output           -> mamba_num_heads, mamba_head_dim  [nh*hd]
  mamba_heads_out    each Mamba head's contribution after `mixer.out_proj` -> mamba_num_heads              [nh]
  block              (layer input, layer output)                        -> num_layers                      []
"Normalised input" is what the pre-sublayer norm produced. With the local spec the norm is a separate
module, so the linear's input already is its output. With Transformer Engine specs the norm is fused into
the linear (`layer_norm_weight`), so it is recomputed here from the linear's input and the norm's
parameters: one mapping serves both specs. An expert's fc2 input already carries its router probability
(MCore scales the activation before fc2), and each call counts as one sample of its [T, Fm] tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_prune.minitron.importance import statistics as S
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.table import LAYER_ROLES, ROUTED_EXPERTS


@dataclass(frozen=True)
class HookSite:
    name: str  # statistic name, the suffix of the store key
    module: str  # path inside a decoder layer; "" is the layer itself; "*" stands for each routed expert
    kind: str  # "input" | "normed_input" | "output_contribution" | "taylor" | "block" | "expert_outputs" | "mamba_x"
    axis: str  # the axis it informs
    group: str = "channel"  # output_contribution/taylor: the unit scored, "channel" | "head" | "query_group" | "mamba_head"

    @property
    def needs_backward(self) -> bool:
        return self.kind == "taylor"

    @property
    def tp_partitioned(self) -> bool:
        """Input of a row-parallel linear (the table splits its weight's input dim) or output of a column-
        parallel one: each TP rank sees its own slice of the channels (the last dim of the accumulator)."""
        if self.kind == "mamba_x":
            return LAYER_ROLES[self.module]["weight"].tp_dim == 0
        linear_input = ("input", "normed_input", "output_contribution", "taylor")
        return self.kind in linear_input and LAYER_ROLES[self.module]["weight"].tp_dim == 1


_PROJ, _FC2 = "self_attention.linear_proj", "mlp.linear_fc2"
_SHARED_FC2, _EXPERT_FC2 = "mlp.shared_experts.linear_fc2", f"{ROUTED_EXPERTS}.*.linear_fc2"
LAYER_SITES: Tuple[HookSite, ...] = (
    HookSite("qkv_in", "self_attention.linear_qkv", "normed_input", "hidden_size"),
    HookSite("mla_in", "self_attention.linear_kv_down_proj", "normed_input", "hidden_size"),
    HookSite("fc1_in", "mlp.linear_fc1", "normed_input", "hidden_size"),
    HookSite("router_in", "mlp.router", "normed_input", "hidden_size"),
    HookSite("mamba_in", "mixer.in_proj", "normed_input", "hidden_size"),
    HookSite("proj_in", _PROJ, "input", "num_attention_heads"),
    HookSite("proj_heads_out", _PROJ, "output_contribution", "num_attention_heads", "head"),
    HookSite("proj_groups_out", _PROJ, "output_contribution", "num_query_groups", "query_group"),
    HookSite("proj_heads_taylor", _PROJ, "taylor", "num_attention_heads", "head"),
    HookSite("proj_groups_taylor", _PROJ, "taylor", "num_query_groups", "query_group"),
    HookSite("fc2_in", _FC2, "input", "ffn_hidden_size"),
    HookSite("fc2_out", _FC2, "output_contribution", "ffn_hidden_size"),
    HookSite("fc2_taylor", _FC2, "taylor", "ffn_hidden_size"),
    HookSite("shared_fc2_in", _SHARED_FC2, "input", "moe_shared_expert_intermediate_size"),
    HookSite("shared_fc2_out", _SHARED_FC2, "output_contribution", "moe_shared_expert_intermediate_size"),
    HookSite("expert_fc2_in", _EXPERT_FC2, "input", "moe_ffn_hidden_size"),
    HookSite("expert_fc2_out", _EXPERT_FC2, "output_contribution", "moe_ffn_hidden_size"),
    HookSite("experts", "mlp.experts", "expert_outputs", "num_moe_experts"),
    HookSite("mamba_x", "mixer.in_proj", "mamba_x", "mamba_num_heads"),
    HookSite("mamba_heads_out", "mixer.out_proj", "output_contribution", "mamba_num_heads", "mamba_head"),
    HookSite("block", "", "block", "num_layers"),
)
FORWARD_SITES = tuple(site.name for site in LAYER_SITES if not site.needs_backward)
SITES: Dict[str, HookSite] = {site.name: site for site in LAYER_SITES}
TP_PARTITIONED_SITES = frozenset(site.name for site in LAYER_SITES if site.tp_partitioned)
# statistics of routed experts, by the dim that counts them: at EP > 1 each rank holds its own experts'
EXPERT_SITE_DIMS = {site.name: (-1 if site.kind == "expert_outputs" else 0)
                    for site in LAYER_SITES if site.kind == "expert_outputs" or "*" in site.module}  # fmt: skip


def stat_key(layer_number: int, site: str) -> str:
    return f"layer{layer_number}/{site}"


def parse_stat_key(key: str) -> Tuple[int, str]:
    """Inverse of `stat_key`: ``"layer3/fc2_in"`` -> (3, ``"fc2_in"``)."""
    layer, _, site = key.partition("/")
    return int(layer[len("layer") :]), site


def statistics_by_layer(keys: Iterable[str]) -> Dict[int, set]:
    """{global layer number: names of the statistics stored for it} for store keys ``layer{n}/{site}``."""
    present: Dict[int, set] = {}
    for key in keys:
        n, name = parse_stat_key(key)
        present.setdefault(n, set()).add(name)
    return present


def is_gradient_statistic(key: str) -> bool:
    """Whether the store key ``layer{n}/{site}`` holds a statistic that needs a backward pass (Taylor)."""
    return SITES[parse_stat_key(key)[1]].needs_backward


def decoder_layers(model: torch.nn.Module) -> Iterator[Tuple[int, torch.nn.Module]]:
    """(global 1-indexed layer number, layer) for the decoder layers this rank holds."""
    for layer in model.decoder.layers:
        yield int(layer.layer_number), layer


def _normed_channel_statistic(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The channel statistic of the pre-sublayer norm's output: x's own with the local spec (the norm is a module
    of its own), recomputed from the linear's input for a Transformer Engine norm fused into the linear
    (`layer_norm_weight`); for RMSNorm without materialising the normalised activations."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return S.channel_sum_sq(x)
    cfg = linear.config
    zc = getattr(cfg, "layernorm_zero_centered_gamma", False)
    if cfg.normalization == "RMSNorm":
        return S.rms_normed_channel_sum_sq(x, weight, cfg.layernorm_epsilon, zc)
    return S.channel_sum_sq(S.layer_norm(x, weight, getattr(linear, "layer_norm_bias", None), cfg.layernorm_epsilon, zc))


def site_modules(layer: torch.nn.Module, path: str) -> List[Tuple[Optional[int], torch.nn.Module]]:
    """The modules of `layer` at `path` as (routed expert number or None, module); [] if the layer has none."""
    if "*" not in path:
        try:
            return [(None, layer.get_submodule(path))]
        except AttributeError:
            return []
    container, _, rest = path.partition(".*.")
    try:
        experts = layer.get_submodule(container)
    except AttributeError:
        return []
    return [(e, expert.get_submodule(rest)) for e, expert in enumerate(experts)]


def register_hooks(model: torch.nn.Module, store: S.StatStore, sites: Iterable[str] = FORWARD_SITES,
                   ctx: Optional[ParallelContext] = None) -> List[torch.utils.hooks.RemovableHandle]:  # fmt: skip
    """Attach one hook per (layer, site module) for the named `sites`; accumulators start at zero so every
    replica holds every key. Collective when the model has routed experts (`ExpertTokens.of`)."""
    unknown = set(sites) - SITES.keys()
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(SITES)}")
    chosen = [site for site in LAYER_SITES if site.name in set(sites)]
    ctx = ParallelContext.given(ctx)
    counted = ExpertTokens.counted_sources(model, ctx)
    joint = {"proj_heads_out", "proj_groups_out"} <= set(sites)  # one hook computes both (about half the work)
    handles = []
    first = True
    for number, layer in decoder_layers(model):
        device = next(layer.parameters()).device  # accumulate where activations live: no sync per call
        layer_tokens = None  # the layer's ExpertTokens, shared by its routed-expert sites
        for site in chosen:
            key = stat_key(number, site.name)
            if site.kind == "block":
                store.add(key, torch.zeros((), device=device))
                handles.append(layer.register_forward_hook(_block_hook(store, key, count=first), with_kwargs=True))
                continue
            modules = site_modules(layer, site.module)
            if not modules:
                continue
            tokens = None
            if site.kind == "expert_outputs" or "*" in site.module:
                tokens = layer_tokens = layer_tokens or ExpertTokens.of(layer, counted, ctx)
            if site.kind == "expert_outputs":
                (_, experts), = modules
                store.add(key, torch.zeros(2, experts.num_local_experts, device=device))
                if tokens.counts_any:
                    handles.append(experts.register_forward_hook(_expert_outputs_hook(store, key, tokens)))
                continue
            if site.kind == "mamba_x":
                (_, in_proj), = modules
                D = layer.mixer.d_inner_local_tp
                store.add(key, torch.zeros(D, device=device))
                handles.append(in_proj.register_forward_hook(_mamba_x_hook(store, key, D)))
                continue
            if site.group == "query_group" and (_kv_groups_replicated(layer) or _is_mla(layer)):
                continue  # a group's heads span TP ranks: its joint contribution is not a per-rank sum; MLA: no groups
            if joint and site.name in ("proj_heads_out", "proj_groups_out") and not (_kv_groups_replicated(layer) or _is_mla(layer)):
                if site.name == "proj_heads_out":
                    handles.append(_register_heads_and_groups(layer, modules[0][1], store, number, device))
                continue
            d = _group_width(layer, site.group)
            width = modules[0][1].weight.shape[1] // d  # input channels per scored unit (1 for channel statistics)
            per_expert = modules[0][0] is not None
            store.add(key, torch.zeros((len(modules), width) if per_expert else (width,), device=device))
            for expert, module in modules:
                if tokens is not None and not tokens.counts_any:
                    break  # another replica of these experts counts every token they see here
                if site.kind == "output_contribution":
                    fn = _output_contribution_hook(store, key, d, row=expert)
                elif site.kind == "taylor":
                    fn = _taylor_hook(store, key, d)
                else:
                    fn = _input_hook(store, key, normalise=site.kind == "normed_input", row=expert)
                if tokens is not None:
                    fn = tokens.counted_segments(fn, expert)
                handles.append(module.register_forward_pre_hook(fn))
        first = False
    return handles


def _register_heads_and_groups(layer, proj: torch.nn.Module, store: S.StatStore, number: int, device) -> torch.utils.hooks.RemovableHandle:
    """One hook on `linear_proj` for the output contribution of its heads and of its query groups."""
    heads, groups = stat_key(number, "proj_heads_out"), stat_key(number, "proj_groups_out")
    attention = layer.self_attention
    G, q = attention.num_query_groups_per_partition, attention.num_attention_heads_per_partition // attention.num_query_groups_per_partition
    store.add(heads, torch.zeros(G * q, device=device))
    store.add(groups, torch.zeros(G, device=device))
    d = _group_width(layer, "query_group")
    blocks: List = []  # the Gram blocks, computed on the first call and kept (see _output_contribution_hook)

    def hook(module, args):
        if not blocks:
            blocks.append(S.gram_blocks(module.weight, q, d // q))
        per_head, per_group = S.head_and_group_output_norms(args[0], blocks[0])
        store.add(heads, per_head)
        store.add(groups, per_group)

    return proj.register_forward_pre_hook(hook)


def _group_width(layer: torch.nn.Module, group: str) -> int:
    """Input channels of the linear per scored unit: 1 for a channel, the head dim for a head, ..."""
    if group == "channel":
        return 1
    if group == "mamba_head":
        return int(layer.mixer.headdim)
    attention = layer.self_attention
    d = int(attention.config.v_head_dim if _is_mla(layer) else attention.hidden_size_per_attention_head)
    if group == "head":
        return d
    return d * (attention.num_attention_heads_per_partition // attention.num_query_groups_per_partition)


def _is_mla(layer: torch.nn.Module) -> bool:
    """Multi-latent attention (MLASelfAttention): v_head_dim channels per head at `linear_proj`, no query groups."""
    return bool(getattr(layer.self_attention.config, "multi_latent_attention", False))


def _kv_groups_replicated(layer: torch.nn.Module) -> bool:
    """Fewer query groups than TP ranks: megatron-core replicates the K/V heads, each rank holds part of a group."""
    attention = layer.self_attention
    return attention.num_query_groups_per_partition * attention.config.tensor_model_parallel_size != attention.config.num_query_groups


def _add(store: S.StatStore, key: str, value: torch.Tensor, row: Optional[int]) -> None:
    if row is None:
        store.add(key, value)
    else:
        store.add_row(key, row, value)


def _input_hook(store: S.StatStore, key: str, normalise: bool, row: Optional[int] = None) -> Callable:
    def hook(module, args):
        x = args[0]
        if x.numel():  # a routed expert that got no tokens in this call: no sample
            _add(store, key, _normed_channel_statistic(module, x) if normalise else S.channel_sum_sq(x), row)

    return hook


class ExpertTokens:
    """Which of the tokens a routed expert computes on this rank count for its statistics: each calibration
    micro-batch's tokens exactly once per expert (per expert-TP shard), as in one process.

    The token dispatcher hands each local expert, in one call, the tokens of every rank of its expert-TP x
    expert-parallel group routed to it, segment by segment: allgather in group-rank order (`local_map`: [ranks x
    tokens, local experts]), alltoall in (expert-TP rank, EP rank) order (`num_global_tokens_per_local_expert`:
    [expert-TP x EP ranks, local experts]). Ranks of one attention-TP group hold the same micro-batch (sequence
    parallelism is off while calibrating), and at TP > expert-TP the replicas of an expert shard see the same
    tokens: of the copies of one micro-batch, the first segment of the lowest rank holding the shard counts.
    Each statistic call then takes one segment: one micro-batch, as one process takes it."""

    def __init__(self, dispatcher, counted: Tuple[bool, ...], ctx: ParallelContext):
        self.dispatcher, self.counted, self.ctx = dispatcher, counted, ctx
        self._sizes, self._sizes_of = None, None  # the allgather segment lengths and the routing map they are of

    @property
    def counts_any(self) -> bool:
        return any(self.counted)

    @staticmethod
    def counted_sources(model: torch.nn.Module, ctx: ParallelContext) -> Optional[Tuple[bool, ...]]:
        """For a model with routed experts: per rank of this rank's dispatcher group, whether its segment counts
        here (None without MoE layers on this stage). A collective over the world when there is more than one
        rank (every rank calls it: the model config says whether it has experts)."""
        if not model.config.num_moe_experts:
            return None
        dispatcher = next((layer.mlp.token_dispatcher for _, layer in decoder_layers(model)
                           if hasattr(getattr(layer, "mlp", None), "token_dispatcher")), None)  # fmt: skip
        group = getattr(dispatcher, "tp_ep_group", None)
        members = None
        if dispatcher is not None:
            members = dist.get_process_group_ranks(group) if group is not None and group.size() > 1 else [ctx.global_rank]
        world = ctx.gather_all((ctx.dp_rank, (ctx.pp_rank, ctx.ep_rank, ctx.etp_rank), members))
        if members is None:
            return None
        shard = world[ctx.global_rank][1]  # the experts' weights this rank holds
        seen = {world[g][0] for rank, (_, other, held) in enumerate(world[: ctx.global_rank])
                if other == shard and held for g in held}  # fmt: skip  micro-batches a lower replica counts
        counted = []
        for g in members:
            counted.append(world[g][0] not in seen)
            seen.add(world[g][0])
        return tuple(counted)

    @classmethod
    def of(cls, layer: torch.nn.Module, counted: Tuple[bool, ...], ctx: ParallelContext) -> "ExpertTokens":
        return cls(layer.mlp.token_dispatcher, counted, ctx)

    def segments(self, expert: int) -> List[Tuple[int, bool]]:
        """(length, counted) of local expert `expert`'s token segments in the current call, in the order they come."""
        d, n = self.dispatcher, len(self.counted)
        if getattr(d, "local_map", None) is not None:  # allgather
            if self._sizes_of is not d.local_map:  # once per call of the layer: [group ranks, local experts]
                self._sizes, self._sizes_of = d.local_map.view(n, -1, d.local_map.shape[-1]).sum(dim=1).T.tolist(), d.local_map
            return list(zip(self._sizes[expert], self.counted))
        etp = n // d.ep_size  # alltoall: row j is expert-TP rank j // EP, EP rank j % EP (group rank: ep * ETP + etp)
        counts = d.num_global_tokens_per_local_expert[:, expert] if d.num_local_experts > 1 else d.output_splits
        return [(int(c), self.counted[(j % d.ep_size) * etp + j // d.ep_size]) for j, c in enumerate(counts.tolist())]

    def counted_segments(self, hook: Callable, expert: int) -> Callable:
        """A forward pre-hook calling `hook` once per counted segment of local expert `expert`'s input."""
        if len(self.counted) == 1:
            return hook

        def per_segment(module, args):
            segments = self.segments(expert)
            for x, (_, counted) in zip(args[0].split([size for size, _ in segments]), segments):
                if counted:
                    hook(module, (x, *args[1:]))

        return per_segment

    def counted_rows(self, tokens_per_expert: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """For the local experts' outputs [T, H] (grouped by expert): a mask of the counted rows (None: all) and the
        counted tokens per expert."""
        if len(self.counted) == 1:
            return None, tokens_per_expert
        segments = [self.segments(e) for e in range(len(tokens_per_expert))]
        sizes = torch.tensor([[size for size, _ in row] for row in segments])  # [E, segments]
        keep = torch.tensor([[counted for _, counted in row] for row in segments])
        return torch.repeat_interleave(keep.flatten(), sizes.flatten()), (sizes * keep).sum(dim=1)


def _output_contribution_hook(store: S.StatStore, key: str, d: int, row: Optional[int] = None) -> Callable:
    """The Gram blocks [G, d, d] of the linear's columns are computed on its first call and kept while the hook
    lives (the weights do not change while calibrating): recomputing them cost as much as the linear itself for
    query groups (G*d*d*H per call). They hold N*d*d + G*(q*d)^2 floats per layer (Llama-3-70B: 32 MB a layer)."""
    gram: List[torch.Tensor] = []

    def hook(module, args):
        x = args[0]
        if x.numel():
            if not gram:
                gram.append(S.column_gram(module.weight, d))
            _add(store, key, S.group_output_norms(x, gram[0]), row)

    return hook


def _taylor_hook(store: S.StatStore, key: str, d: int) -> Callable:
    """Registers, on the linear's input, a gradient hook that adds the Taylor score once backward reaches it."""

    def hook(module, args):
        x = args[0]
        if x.requires_grad and torch.is_grad_enabled():
            # x is held in a list emptied on use: a closure holding x itself would form a cycle through
            # autograd's C++ hook table that Python's gc cannot see, keeping every call's input alive
            held = [x]
            x.register_hook(lambda grad: store.add(key, S.taylor_groups(held.pop(), grad, d)))

    return hook


def _expert_outputs_hook(store: S.StatStore, key: str, tokens: ExpertTokens) -> Callable:
    def hook(module, args, output):
        # SequentialMLP(tokens [T, H] sorted by expert, tokens_per_expert [E], probs) -> (outputs [T, H], bias);
        # at expert-TP > 1 each rank's outputs are partial sums over its shard of the experts' channels
        # (the counted rows only: the ranks of an expert-TP group count the same ones)
        mask, counts = tokens.counted_rows(torch.as_tensor(args[1]).cpu())
        outputs = output[0].detach() if mask is None else output[0].detach()[mask.to(output[0].device)]
        store.add(key, S.expert_output_norms(tokens.ctx.sum_over_etp(outputs), counts))

    return hook


def _mamba_x_hook(store: S.StatStore, key: str, d_inner: int) -> Callable:
    def hook(module, args, output):
        # in_proj output [S, B, 2D + 2*ng*ds + nh] = [z, x, B, C, dt]: the heads' channels are x = [D, 2D)
        out = output[0] if isinstance(output, (tuple, list)) else output
        store.add(key, S.channel_sum_sq(out[..., d_inner : 2 * d_inner]))

    return hook


def _block_hook(store: S.StatStore, key: str, count: bool) -> Callable:
    def hook(module, args, kwargs, output):
        x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x_out = output[0] if isinstance(output, (tuple, list)) else output
        store.add(key, S.block_influence(x_in, x_out))
        if count:
            store.calls += 1

    return hook


def collect_statistics(model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None],
                       sites: Iterable[str] = FORWARD_SITES, store: Optional[S.StatStore] = None,
                       ctx: Optional[ParallelContext] = None) -> S.StatStore:  # fmt: skip
    """Run `forward_loop(model)` in eval mode and return this rank's raw statistics of the named `sites`
    (accumulated into `store` if given, so the loop may read them while it runs, e.g. to checkpoint them).

    Without Taylor sites it runs without gradients. With them gradients are enabled, and the loop must run
    backward (`forward_loop.runs_backward`); parameter gradients are restored to what they were before."""
    sites = tuple(sites)
    backward = any(SITES[s].needs_backward for s in sites if s in SITES)
    store = S.StatStore() if store is None else store
    handles = register_hooks(model, store, sites, ctx)
    modes = {m: m.training for m in model.modules()}  # restored module by module, as the user set them
    grads = {p: p.grad for p in model.parameters()} if backward else {}  # the user's, restored afterwards
    model.eval()
    try:
        with torch.set_grad_enabled(backward):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for p, grad in grads.items():
            p.grad = grad
    return store


def local_layer_numbers(model: torch.nn.Module) -> Dict[int, int]:
    """{global layer number: position in this rank's decoder.layers}."""
    return {number: i for i, (number, _) in enumerate(decoder_layers(model))}
