"""Depth controls: which layers a prune may drop, and how the layers are ranked for dropping.

    depth = DepthOptions.of({"layers_to_drop": [5, 6]})          # explicit: overrides the ranking
    depth = DepthOptions.of({"protected_layers": ["first", "last"], "iterative": True})
    prune(model, {"num_layers": 20}, loop, depth=depth)

Layers are 1-indexed global numbers, as in every log line and summary. Protected layers may be given as numbers
(negative counts from the end: -1 is the last layer) or as words: "first", "last", and for hybrid models
"attention" (every attention layer). They are never dropped, by a manual prune or by any NAS candidate.

Iterative scoring ranks depth the way SLEB removes blocks, one at a time: compute the block influence of every
remaining layer on the calibration data, drop the least influential (the layer then forwards its input
unchanged), re-score the rest on the same data, and repeat. One forward pass over the calibration data per
dropped layer. The one-shot default scores every layer once, in the full model.

Invariant: the returned layer ranking is a permutation of 1..L; protected layers come first, explicitly dropped
layers last, so "keep the top n" never drops a protected layer and drops exactly `layers_to_drop`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.common.log import log

Layer = Union[int, str]
_WORDS = ("first", "last", "attention")


@dataclass(frozen=True)
class DepthOptions:
    layers_to_drop: Tuple[int, ...] = ()  # 1-indexed; the depth becomes num_layers - len(layers_to_drop)
    protected_layers: Tuple[Layer, ...] = ()  # never dropped: numbers (-1: last) or "first", "last", "attention"
    iterative: bool = False  # re-score block influence after each dropped layer (one forward pass each)

    @classmethod
    def of(cls, value: Union[None, "DepthOptions", Mapping[str, object]]) -> "DepthOptions":
        from megatron_prune.common.options import dataclass_of

        def listed(v):  # "first" or 5 alone, or any sequence of them
            return (v,) if isinstance(v, (str, int)) else tuple(v or ())

        if isinstance(value, Mapping):
            value = {k: v if k == "iterative" else listed(v) for k, v in value.items()}
        return dataclass_of(cls, value, "depth")

    def resolve(self, num_layers: int, symbols: Sequence[str]) -> "ResolvedDepth":
        """Check the fields against a model of `num_layers` layers (`symbols[n-1]`: what layer n holds in hybrid
        pattern symbols, "*" attention) and resolve protected words to numbers. Raises PruneConfigError."""
        drop = _numbers("depth.layers_to_drop", self.layers_to_drop, num_layers, allow_words=False, symbols=symbols)
        protect = _numbers("depth.protected_layers", self.protected_layers, num_layers, allow_words=True, symbols=symbols)
        both = sorted(set(drop) & set(protect))
        if both:
            raise PruneConfigError(f"depth: layers {both} are both protected and in layers_to_drop")
        if len(drop) >= num_layers:
            raise PruneConfigError(f"depth.layers_to_drop would drop all {num_layers} layers")
        if not isinstance(self.iterative, bool):
            raise PruneConfigError(f"depth.iterative={self.iterative!r} must be true or false")
        return ResolvedDepth(tuple(drop), tuple(sorted(protect)), self.iterative)


@dataclass(frozen=True)
class ResolvedDepth:
    layers_to_drop: Tuple[int, ...]
    protected: Tuple[int, ...]
    iterative: bool
    scoring: Dict[str, object] = field(default_factory=dict, compare=False)  # iterative: passes, seconds, drop_order

    def check_target(self, num_layers: int, target_layers: Optional[int]) -> int:
        """The pruned depth: `num_layers - len(layers_to_drop)` when layers are dropped explicitly (a given
        `target_layers` must agree), else `target_layers`; never fewer than the protected layers."""
        if self.layers_to_drop:
            implied = num_layers - len(self.layers_to_drop)
            if target_layers is not None and target_layers not in (implied, num_layers):
                raise PruneConfigError(f"export_config['num_layers']={target_layers} disagrees with depth.layers_to_drop "
                                       f"({len(self.layers_to_drop)} of {num_layers} layers dropped leaves {implied})")  # fmt: skip
            return implied
        depth = num_layers if target_layers is None else target_layers
        if depth < len(self.protected):
            raise PruneConfigError(f"export_config['num_layers']={depth} is fewer than the {len(self.protected)} "
                                   f"protected layers {list(self.protected)}")  # fmt: skip
        return depth

    def record(self) -> Optional[dict]:
        """What the summary and PruneResult.depth record (None when no control was used)."""
        if not (self.layers_to_drop or self.protected or self.iterative):
            return None
        return {"layers_to_drop": list(self.layers_to_drop), "protected_layers": list(self.protected),
                "iterative": self.iterative, **({"iterative_scoring": self.scoring} if self.scoring else {})}  # fmt: skip

    def cache_key(self) -> Dict[str, object]:
        """What, beyond the criteria, decides which layers a NAS candidate keeps (part of its cache key)."""
        return {"protected_layers": list(self.protected), "iterative_depth": self.iterative}

    def ranking(self, ranking: Sequence[int]) -> List[int]:
        """`ranking` (most important first) with protected layers moved to the front and explicitly dropped
        layers to the back, each group keeping its order."""
        protected, drop = set(self.protected), set(self.layers_to_drop)
        return ([n for n in ranking if n in protected] + [n for n in ranking if n not in protected and n not in drop]
                + [n for n in ranking if n in drop])  # fmt: skip


def _numbers(name: str, values: Sequence[Layer], num_layers: int, allow_words: bool, symbols: Sequence[str]) -> List[int]:
    if isinstance(values, (str, int)):
        values = (values,)
    out: List[int] = []
    for v in values:
        if isinstance(v, str) and allow_words:
            word = v.strip().lower()
            if word not in _WORDS and not word.lstrip("-").isdigit():
                raise PruneConfigError(f"{name}: {v!r} is not a layer number or one of {', '.join(_WORDS)}")
            if word in ("first", "last"):
                out.append(1 if word == "first" else num_layers)
                continue
            if word == "attention":
                found = [n for n in range(1, num_layers + 1) if "*" in symbols[n - 1]]
                if not found:
                    raise PruneConfigError(f"{name}: 'attention' names no layer: the model has no attention layers")
                out.extend(found)
                continue
            v = int(word)
        if isinstance(v, bool) or not isinstance(v, int):
            raise PruneConfigError(f"{name}: {v!r} is not a layer number (1-indexed)")
        n = v + num_layers + 1 if allow_words and v < 0 else v
        if not 1 <= n <= num_layers:
            raise PruneConfigError(f"{name}: layer {v} is out of range 1..{num_layers}" + (" (or -1..-L)" if allow_words else ""))
        if n in out and not allow_words:
            raise PruneConfigError(f"{name}: layer {v} is listed twice")
        out.append(n)
    return sorted(set(out)) if allow_words else out


def parse_layer_list(text: str) -> List[Layer]:
    """"1,5-7,last" -> [1, 5, 6, 7, "last"] (command-line form; ranges inclusive)."""
    out: List[Layer] = []
    for item in filter(None, (part.strip() for part in text.replace(" ", ",").split(","))):
        first, dash, last = item.partition("-")
        if dash and first.isdigit() and last.isdigit():
            out.extend(range(int(first), int(last) + 1))
        elif item.lstrip("-").isdigit():
            out.append(int(item))
        else:
            out.append(item)
    return out


def iterative_ranking(model: torch.nn.Module, forward_loop: Callable, ctx, ranking: Sequence[int],
                      protected: Sequence[int], down_to: int) -> Tuple[List[int], Dict[str, object]]:  # fmt: skip
    """SLEB-style depth ranking: drop the least influential unprotected layer, re-score the remaining ones on the
    same data (`forward_loop`), until `down_to` layers remain. Returns (ranking, cost): kept layers in their last
    scores' order, then the dropped ones, the last dropped first. `ranking`: the one-shot ranking (it orders
    the kept layers when no drop is needed)."""
    from megatron_prune.minitron.importance.hooks import collect_statistics, decoder_layers, parse_stat_key
    from megatron_prune.minitron.importance.reduce import reduce_statistics

    skipped: List[int] = []
    handles: List = []
    layers = dict(decoder_layers(model))
    start = time.perf_counter()
    passes, current = 0, list(ranking)
    try:
        while len(ranking) - len(skipped) > down_to:
            stats = reduce_statistics(collect_statistics(model, forward_loop, ("block",), ctx=ctx), ctx)
            passes += 1
            scores = {parse_stat_key(k)[0]: float(v) for k, v in stats.sums.items()}
            alive = [n for n in ranking if n not in skipped]
            current = sorted(alive, key=lambda n: -scores[n])  # stable: ties keep the one-shot order
            candidates = [n for n in reversed(current) if n not in protected]
            if not candidates:
                break
            victim = candidates[0]
            skipped.append(victim)
            log(f"iterative depth scoring: pass {passes}, dropping layer {victim} (block influence {scores[victim]:.4g})")
            if victim in layers:
                handles.append(layers[victim].register_forward_hook(_identity_hook, with_kwargs=True))
    finally:
        for h in handles:
            h.remove()
    kept = [n for n in current if n not in skipped]
    cost = {"passes": passes, "seconds": round(time.perf_counter() - start, 3), "drop_order": list(skipped)}
    return kept + list(reversed(skipped)), cost


def _identity_hook(module, args, kwargs, output):
    """A dropped layer forwards its input unchanged (its output is replaced, keeping the output's structure)."""
    x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if isinstance(output, tuple):
        return (x_in, *output[1:])
    return x_in
