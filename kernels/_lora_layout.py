"""Segment layout of a multi-adapter LoRA batch: rows grouped by adapter id into whole row blocks.

With one adapter per task and tasks mixed in one batch, row i of X (N, in) uses adapter id_i in
[-1, T) (-1 = base layer only). The layout sorts the rows by id (stable, on the device, no host sync
beyond one range check) and pads each group to whole blocks of BLOCK_M rows, so every row block of
the LoRA kernels (``lora.py``) uses exactly one adapter, and its A/B tiles are plain 2-D tiles for
``tl.dot``; the kernels gather X rows through the permutation and scatter Y rows back, so X is never
copied. This is Punica's SGMV / S-LoRA layout; docs/lora.md says why it beats looping over adapters.
"""
import weakref

import torch


class Layout:
    """Segment layout of rows by adapter id (multi-adapter form).

    rows (num_blocks * BM,) int32: original row index, -1 for padding; each group of rows with the
    same id starts at a block boundary. block_adapter (num_blocks,) int32: the adapter of each
    block, -1 = no adapter, -2 = past the end. group_start/group_end (T,) int32: block range of
    each adapter (for the dA/dB reduction).
    """

    __slots__ = ("rows", "block_adapter", "group_start", "group_end", "num_blocks", "block_m")

    def __init__(self, ids: torch.Tensor, num_adapters: int, block_m: int):
        device = ids.device
        n = ids.numel()
        groups = num_adapters + 1
        gid = ids.to(torch.int64) + 1  # (N,) 0 = no adapter, 1..T = adapters
        counts = torch.zeros(groups, dtype=torch.int64, device=device)
        counts.scatter_add_(0, gid, torch.ones_like(gid))  # no host sync (unlike bincount on CUDA)
        nblk = (counts + block_m - 1) // block_m
        blk_end = torch.cumsum(nblk, 0)
        blk_start = blk_end - nblk
        row_start = torch.cumsum(counts, 0) - counts
        order = torch.argsort(gid, stable=True)  # (N,) rows grouped by adapter, original order kept
        sorted_gid = gid[order]
        dest = blk_start[sorted_gid] * block_m + (torch.arange(n, device=device) - row_start[sorted_gid])
        self.num_blocks = -(-n // block_m) + groups  # upper bound: each group adds <= 1 partial block
        self.block_m = block_m
        self.rows = torch.full((self.num_blocks * block_m,), -1, dtype=torch.int32, device=device)
        self.rows[dest] = order.to(torch.int32)
        blocks = torch.arange(self.num_blocks, device=device)
        group_of_block = torch.bucketize(blocks, blk_end, right=True)  # in [0, groups]
        self.block_adapter = torch.where(group_of_block < groups, group_of_block - 1, -2).to(torch.int32)
        self.group_start = blk_start[1:].to(torch.int32).contiguous()
        self.group_end = blk_end[1:].to(torch.int32).contiguous()


_LAST_LAYOUT: list = [None]  # (weakref to adapter_ids, version, key, layout): layers of one pass share it


def layout_for(adapter_ids: torch.Tensor, rows_per_id: int, num_adapters: int, block_m: int) -> Layout:
    """Segment layout for these ids, reused while the same, unmodified ids tensor comes back
    (every LoRA layer of one forward pass): the range check's host sync then happens once."""
    key = (num_adapters, block_m, rows_per_id, adapter_ids.numel(), adapter_ids.device)
    cached = _LAST_LAYOUT[0]
    if cached is not None:
        ref, version, ckey, layout = cached
        if ref() is adapter_ids and version == adapter_ids._version and ckey == key:
            return layout
    check_id_range(adapter_ids, num_adapters)
    layout = Layout(per_row_ids(adapter_ids, rows_per_id), num_adapters, block_m)
    _LAST_LAYOUT[0] = (weakref.ref(adapter_ids), adapter_ids._version, key, layout)
    return layout


def check_id_range(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """Ids must lie in [-1, T) (one host sync)."""
    if adapter_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(adapter_ids))
    if lo < -1 or hi >= num_adapters:
        raise ValueError(
            f"lora_linear: argument 'adapter_ids' must lie in [-1, {num_adapters}) for T={num_adapters} adapters "
            f"(-1 = no adapter), got values in [{lo}, {hi}]"
        )


def per_row_ids(adapter_ids: torch.Tensor, rows_per_id: int) -> torch.Tensor:
    """(N,) int64 id per row of x flattened to (N, in); per-sequence ids repeat over each sequence."""
    if rows_per_id != 1:
        adapter_ids = adapter_ids[:, None].expand(-1, rows_per_id).reshape(-1)
    return adapter_ids.to(torch.int64)
