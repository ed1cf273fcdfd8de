"""SG-CNN's algorithm on layers small enough to work out by hand."""

import copy

import numpy as np
import pytest
import torch

from sgcompress.config import PruneConfig
from sgcompress.errors import ConfigError
from sgcompress.grouping import cluster_filters
from sgcompress.importance import connection_l1
from sgcompress.layers import MaskedConv2d
from sgcompress.sgcnn import prune_step, sgcnn_prune

# Importance rows of 4 filters over 3 inputs: two obvious clusters.
# A = {f0, f1}: centroid (9, 1, 1); B = {f2, f3}: centroid (1, 5, 1).
V = torch.tensor([[8.0, 2.0, 0.0], [10.0, 0.0, 2.0], [0.0, 6.0, 1.0], [2.0, 4.0, 1.0]])


def conv_weight(v: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight whose |W| summed over each 3x3 slice is ``v``, with mixed signs."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]).view(3, 3)
    return v[:, :, None, None] / 9.0 * signs


def test_importance_is_masked_l1_over_the_kernel():
    w = conv_weight(V)
    assert torch.allclose(connection_l1(w), V.double())
    mask = torch.tensor([[1.0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]])
    assert torch.allclose(connection_l1(w, mask), (V * mask).double())
    lin = torch.tensor([[-1.5, 2.0]])
    assert connection_l1(lin).tolist() == [[1.5, 2.0]]


def test_kmeans_finds_the_two_clusters_and_is_seeded():
    c = cluster_filters(V.numpy(), 2, seed=0)
    assert c.labels[0] == c.labels[1] != c.labels[2] == c.labels[3]
    a = c.labels[0]
    np.testing.assert_allclose(c.centroids[a], [9, 1, 1])
    np.testing.assert_allclose(c.centroids[1 - a], [1, 5, 1])
    again = cluster_filters(V.numpy(), 2, seed=0)
    assert (again.labels == c.labels).all()


def test_first_step_by_hand():
    # Member-replicated centroids: 9,1,1 | 9,1,1 | 1,5,1 | 1,5,1 -> sorted: eight 1s, two 5s, two 9s.
    # 50th percentile (linear interpolation at position 5.5 of 12) = 1; keep entries > 1:
    # cluster A keeps input 0, cluster B keeps input 1 (ties at the threshold are pruned, as in the authors' code).
    res = prune_step(conv_weight(V), torch.ones(4, 3), 2, 0.5, seed=0)
    assert res.threshold == pytest.approx(1.0)
    assert res.mask.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_second_step_is_cumulative_and_can_empty_a_group():
    step1 = prune_step(conv_weight(V), torch.ones(4, 3), 2, 0.5, seed=0).mask
    # Masked importance: A rows (8,0,0),(10,0,0) -> centroid (9,0,0); B rows (0,6,0),(0,4,0) -> (0,5,0).
    # Entries: 9,0,0 twice and 0,5,0 twice -> sorted eight 0s, 5, 5, 9, 9; 75th percentile at 8.25 -> 5.
    # Keep > 5: A keeps input 0; B keeps nothing (5 is not > 5).
    res = prune_step(conv_weight(V), step1, 2, 0.75, seed=0)
    assert res.threshold == pytest.approx(5.0)
    assert res.mask.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_threshold_uses_the_first_members_mask():
    # f0 and f1 end up in one cluster, but f1 has input 0 pruned already while f0 does not:
    # the cluster row is centroid * mask[f0], so input 0 competes with its full centroid value.
    v = torch.tensor([[6.0, 1.0], [6.0, 1.0], [1.0, 6.0], [1.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    res = prune_step(v, mask, 2, 0.5, seed=0)
    # masked importance rows: (6,1),(0,1),(1,6),(1,6): k-means puts f0,f1 apart from f2,f3?
    labels = res.labels
    assert labels[2] == labels[3]
    # whatever the clustering, pruning never revives a pruned connection
    assert (res.mask <= mask).all()


def test_schedule_and_fc_cap():
    cfg = PruneConfig(groups=4, ratio=0.6)
    assert cfg.conv_schedule() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert cfg.fc_schedule() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    cfg = PruneConfig(groups=4, ratio=0.8)
    assert cfg.fc_schedule()[-1] == 0.6 and cfg.conv_schedule()[-1] == 0.8
    assert PruneConfig(ratio=0.65).conv_schedule()[-1] == 0.65 and PruneConfig(ratio=0.65).n_steps == 7
    assert PruneConfig(ratio=0.6, steps=3).conv_schedule() == [0.2, 0.4, 0.6]
    assert PruneConfig(ratio=0.4, fc_ratio=0.8).fc_schedule() == [0.2, 0.4, 0.6, 0.8]
    assert PruneConfig(ratio=0.0).conv_schedule() == []


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.1}, {"groups": 0}, {"fc_ratio": 1.2},
                                    {"steps": 0}, {"target_macs": 0.0}, {"target_macs": 1.5}])
def test_bad_settings_name_the_fix(kwargs):
    with pytest.raises(ConfigError, match="must be"):
        PruneConfig(**kwargs)


def test_whole_schedule_reaches_the_ratio_and_is_reproducible():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3)

    def run():
        m = torch.nn.Sequential(MaskedConv2d.from_dense(copy.deepcopy(conv)))  # from_dense shares weights
        plan = sgcnn_prune(m, ["0"], PruneConfig(groups=4, ratio=0.6), kinds={"0": "conv"})
        return m, plan

    m, plan = run()
    sparsity = 1 - m[0].connection_mask.mean().item()
    assert abs(sparsity - 0.6) < 0.01
    lp = plan.layers[0]
    assert torch.equal(lp.mask(), m[0].connection_mask)
    assert sorted(f for b in lp.blocks for f in b.filters) == list(range(64))
    assert len(set(lp.labels)) <= 4
    _, plan2 = run()
    assert plan2.to_json() == plan.to_json()
    # pruned weights are exactly zero in the layer itself
    assert (m[0].weight[m[0].connection_mask == 0] == 0).all()


def test_round_kept_inputs_by_hand():
    from sgcompress.sgcnn import round_kept_inputs

    # group A = filters 0,1 keep 3 of 8 inputs; group B = filter 2 keeps 6; filter 3 keeps none
    mask = torch.zeros(4, 8)
    mask[0:2, [0, 1, 2]] = 1
    mask[2, [0, 1, 2, 3, 4, 5]] = 1
    importance = torch.arange(32, dtype=torch.float64).view(4, 8)  # later inputs are more important
    r = round_kept_inputs(mask, importance, 4)
    # A: 3 -> 4, adds its most important pruned input (7); B: 6 -> 8 (nearest multiple, ties go up
    # with Python's round(1.5) = 2), adds 7 and 6; the empty filter stays empty
    assert r[0].nonzero().flatten().tolist() == [0, 1, 2, 7] and torch.equal(r[0], r[1])
    assert r[2].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert r[3].sum() == 0
    # with multiple 5, A: 3 -> 5 (rounds up to 5); B: 6 -> 5 drops its least important kept input (0)
    r5 = round_kept_inputs(mask, importance, 5)
    assert int(r5[0].sum()) == 5 and r5[2].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_round_to_in_the_schedule_restores_pretrained_values():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3)
    m = torch.nn.Sequential(MaskedConv2d.from_dense(copy.deepcopy(conv)))
    sgcnn_prune(m, ["0"], PruneConfig(groups=4, ratio=0.5, round_to=4), kinds={"0": "conv"})
    layer = m[0]
    assert all(int(row.sum()) % 4 == 0 for row in layer.connection_mask)
    kept = layer.connection_mask.bool()
    assert torch.equal(layer.weight[kept], conv.weight[kept])  # every kept weight is the pretrained one
    assert (layer.weight[~kept] == 0).all()
