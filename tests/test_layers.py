"""Invariants of the masked layers and of surgery."""

import copy

import torch
from torch import nn

from sgcompress.layers import MaskedConv2d, MaskedLinear, keep_pruned_zero, masked_layers, zero_pruned_
from sgcompress.plan import CompressionPlan, blocks_from_mask, mask_from_blocks
from sgcompress.surgery import apply_plan, strip_masks, to_masked


def test_masked_conv_is_a_conv_with_the_same_state_dict_keys(tiny):
    keys = list(tiny.state_dict())
    to_masked(tiny, ["conv1", "fc"])
    assert isinstance(tiny.conv1, nn.Conv2d) and isinstance(tiny.conv1, MaskedConv2d)
    assert list(tiny.state_dict()) == keys  # masks are not saved: they come from the plan
    assert set(masked_layers(tiny)) == {"conv1", "fc"}


def test_all_ones_mask_leaves_outputs_identical(tiny):
    x = torch.randn(4, 1, 8, 8)
    ref = tiny(x)
    to_masked(tiny, ["conv1", "conv2", "pw", "fc"])
    assert torch.equal(tiny(x), ref)


def test_mask_zeroes_weights_and_outputs_follow():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    m = MaskedConv2d.from_dense(copy.deepcopy(conv))
    mask = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]])
    m.set_mask(mask)
    assert (m.weight[mask == 0] == 0).all() and (m.weight[mask == 1] != 0).all()
    x = torch.randn(2, 3, 5, 5)
    ref = nn.functional.conv2d(x, conv.weight * mask[:, :, None, None], conv.bias, padding=1)
    torch.testing.assert_close(m(x), ref)
    torch.testing.assert_close(m.to_dense()(x), ref)
    # a filter with no input left outputs its bias everywhere
    torch.testing.assert_close(m(x)[:, 3], conv.bias[3].expand(2, 5, 5))


def test_pruned_connections_stay_zero_through_optimizer_steps():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(4, 6, 3), nn.Flatten(), MaskedLinear(6 * 4 * 4, 5))
    g = torch.Generator().manual_seed(1)
    model[0].set_mask((torch.rand(6, 4, generator=g) > 0.5).float())
    model[2].set_mask((torch.rand(5, 96, generator=g) > 0.5).float())
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
                torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)):
        keep_pruned_zero(opt, model)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4, 6, 6)).square().mean().backward()
            opt.step()
        for layer in (model[0], model[2]):
            assert (layer.weight[layer.connection_mask == 0] == 0).all()
            assert (layer.weight[layer.connection_mask == 1] != 0).any()


def test_zero_pruned_repairs_weights_moved_by_hand():
    m = nn.Sequential(MaskedLinear(3, 2))
    m[0].set_mask(torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    zero_pruned_(m)
    assert m[0].weight.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_blocks_round_trip_and_group_identical_rows():
    mask = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    blocks = blocks_from_mask(mask)
    assert [(b.filters, b.inputs) for b in blocks] == [((0, 2), (0, 2)), ((1,), (1,)), ((3,), ())]
    assert torch.equal(mask_from_blocks(blocks, 4, 3), mask)


def test_apply_plan_and_strip_masks_keep_the_function(tiny):
    from sgcompress.config import PruneConfig
    from sgcompress.pipeline import prune_model

    x = torch.randn(3, 1, 8, 8)
    reference = copy.deepcopy(tiny)
    res = prune_model(tiny, (1, 8, 8), PruneConfig(groups=2, ratio=0.5))
    out = tiny(x)
    plan = CompressionPlan.from_json(res.plan.to_json())
    fresh = apply_plan(copy.deepcopy(reference), plan)
    fresh.load_state_dict(tiny.state_dict())
    torch.testing.assert_close(fresh(x), out)
    torch.testing.assert_close(strip_masks(fresh)(x), out)
    assert not masked_layers(fresh)
