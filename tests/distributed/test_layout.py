"""The zigzag context-parallel layout (openmsa.distributed): every token on exactly one
rank, rank r holding chunks r and 2W-1-r of each sequence, shard/unshard inverse, any
sequence length, clear errors."""

import pytest
import torch

from openmsa.distributed import shard, shard_indices, unshard

LENS = [[1], [7], [16], [3, 0, 40, 5], [100, 13, 2, 64]]


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def chunk_bounds(length, world_size, c):
    n = 2 * world_size
    return c * length // n, (c + 1) * length // n


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_token_once_in_zigzag_order(lens, world_size):
    cu = cu_of(lens)
    got = [shard_indices(cu, world_size, r) for r in range(world_size)]
    allidx = torch.cat(got)
    assert torch.equal(allidx.sort().values, torch.arange(sum(lens)))
    for r, idx in enumerate(got):
        want = []
        for b, length in enumerate(lens):
            start = int(cu[b])
            for c in (r, 2 * world_size - 1 - r):
                lo, hi = chunk_bounds(length, world_size, c)
                want += list(range(start + lo, start + hi))
        assert idx.tolist() == want


@pytest.mark.parametrize("world_size", [2, 3])
def test_chunks_as_even_as_integers_allow_and_balanced(world_size):
    length = 1000
    sizes = [hi - lo for lo, hi in (chunk_bounds(length, world_size, c) for c in range(2 * world_size))]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == length
    cu = cu_of([length])
    # causal work of a rank: sum over its tokens of (position + 1); zigzag keeps it within 1%
    work = [float((shard_indices(cu, world_size, r) + 1).sum()) for r in range(world_size)]
    assert max(work) / min(work) < 1.01


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_then_unshard_is_the_identity(lens, world_size):
    cu = cu_of(lens)
    x = torch.randn(sum(lens), 3, 2)
    parts = [shard(x, cu, world_size, r) for r in range(world_size)]
    assert sum(p.shape[0] for p in parts) == x.shape[0]
    assert torch.equal(unshard(parts, cu), x)


def test_unshard_is_differentiable():
    cu = cu_of([10, 7])
    x = torch.randn(17, 4, requires_grad=True)
    parts = [shard(x, cu, 2, r) for r in range(2)]
    w = torch.randn(17, 4)
    (unshard(parts, cu) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_bad_arguments_raise():
    cu = cu_of([5, 3])
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="rank"):
        shard(x, cu, 2, 2)
    with pytest.raises(TypeError, match="rank"):
        shard(x, cu, 2, 1.0)
    with pytest.raises(ValueError, match="world_size"):
        shard(x, cu, 0, 0)
    with pytest.raises(ValueError, match="rows"):
        shard(x[:7], cu, 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard(x, torch.tensor([1, 8], dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard(x, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 2, 0)
    with pytest.raises(TypeError, match="cu_seqlens"):
        shard(x, torch.tensor([0.0, 8.0]), 2, 0)
    parts = [shard(x, cu, 2, r) for r in range(2)]
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        unshard([parts[0], parts[1][:-1]], cu)
    with pytest.raises(ValueError, match="one shard per rank"):
        unshard([], cu)


def test_inputs_unchanged_and_empty_pack():
    cu = cu_of([4, 6])
    x = torch.randn(10, 2)
    before, cu_before = x.clone(), cu.clone()
    shard(x, cu, 3, 1)
    assert torch.equal(x, before) and torch.equal(cu, cu_before)
    empty = torch.zeros(1, dtype=torch.int32)
    assert shard(torch.randn(0, 2), empty, 2, 1).shape == (0, 2)
    assert unshard([torch.randn(0, 2)] * 2, empty).shape == (0, 2)
