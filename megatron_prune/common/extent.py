"""How one tensor dimension depends on the pruned groups: its length and the indices it keeps.

A dimension is a sequence of segments laid end to end. A segment is either fixed (never pruned) or belongs to
a channel group: `units` units of the group, each `repeat` consecutive elements long (a channel of a
flattened `[C, H, W]` map is `H*W` elements; an attention head is `head_dim` elements). Concatenating feature
maps concatenates their segments.

    conv weight [out, in, k, k]:     dim 1 = Extent((Segment("stem", 32),))
    linear after flatten of [C,H,W]: dim 1 = Extent((Segment("layer4", 256, repeat=16),))
    cat([a (group a, 64), x (fixed, 3)]): Extent((Segment("a", 64), Segment(None, 3)))

`length` and `indices` are the one place where a segment's geometry is read: counting (params, FLOPs) and
slicing both use them, so a predicted count always equals the count of the sliced model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch


@dataclass(frozen=True)
class Segment:
    group: Optional[str]  # None: a fixed run of `units * repeat` elements
    units: int
    repeat: int = 1


@dataclass(frozen=True)
class Extent:
    segments: Tuple[Segment, ...]

    @property
    def full_length(self) -> int:
        return sum(s.units * s.repeat for s in self.segments)

    @property
    def groups(self) -> Tuple[str, ...]:
        return tuple(s.group for s in self.segments if s.group is not None)

    def length(self, widths: Mapping[str, int]) -> int:
        """Elements kept when each group keeps `widths[group]` units."""
        return sum((s.units if s.group is None else widths[s.group]) * s.repeat for s in self.segments)

    def indices(self, kept: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Positions along this dim that survive, given each group's kept unit indices (in the order they are
        to appear). `[sum of kept lengths]` int64."""
        parts, offset = [], 0
        for s in self.segments:
            if s.group is None:
                parts.append(torch.arange(offset, offset + s.units * s.repeat))
            else:
                units = kept[s.group].to(torch.int64)
                parts.append((offset + units[:, None] * s.repeat + torch.arange(s.repeat)[None, :]).reshape(-1))
            offset += s.units * s.repeat
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def unit_view(self, tensor: torch.Tensor, dim: int, group: str) -> torch.Tensor:
        """The slices of `tensor` along `dim` that belong to `group`, as `[units, repeat, *rest]` (each segment of
        the group stacked on the unit axis is not allowed: a group appears at most once per dim)."""
        offset = 0
        for s in self.segments:
            if s.group == group:
                block = tensor.movedim(dim, 0)[offset:offset + s.units * s.repeat]
                return block.reshape(s.units, s.repeat, *block.shape[1:])
            offset += s.units * s.repeat
        raise KeyError(group)


def slice_tensor(tensor: torch.Tensor, dims: Mapping[int, Extent], kept: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`tensor` with every dim in `dims` reduced to its kept positions (a new, contiguous tensor)."""
    out = tensor
    for d, extent in sorted(dims.items()):
        out = out.index_select(d, extent.indices(kept).to(out.device))
    return out.contiguous()
