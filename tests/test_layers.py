import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, NaiveSyncBatchNorm, get_norm

import slim_det
from slim_det.layers import (
    CACHED_WEIGHT,
    SlimConv2d,
    SlimConvTranspose2d,
    SlimGroupNorm,
    SlimLinear,
    SwitchableNorm,
    make_slimmable_,
)

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _slim(module, **kwargs):
    return make_slimmable_(module, WIDTHS, divisor=4, **kwargs)


def _grad_outside(tensor, rows, cols=None):
    mask = torch.ones_like(tensor, dtype=torch.bool)
    if cols is None:
        mask[:rows] = False
    else:
        mask[:rows, :cols] = False
    return tensor.grad[mask].abs().sum().item()


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_slim_conv_equals_plain_conv_on_sliced_weights(width):
    torch.manual_seed(0)
    conv = _slim(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2)))[0]
    assert isinstance(conv, SlimConv2d)
    conv.width = width
    out_c, in_c = int(32 * width), 8
    x = torch.randn(2, in_c, 9, 9)
    y = conv(x)
    ref = F.conv2d(x, conv.weight[:out_c, :in_c], conv.bias[:out_c], stride=2, padding=1)
    assert y.shape == (2, out_c, 5, 5)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.sum().backward()
    assert _grad_outside(conv.weight, out_c, in_c) == 0
    assert _grad_outside(conv.bias, out_c) == 0
    assert conv.weight.grad[:out_c, :in_c].abs().sum() > 0


def test_depthwise_conv_groups_follow_input():
    torch.manual_seed(0)
    conv = _slim(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)))[0]
    conv.width = 0.5  # ignored: a depthwise conv follows its input
    x = torch.randn(1, 12, 6, 6)
    ref = F.conv2d(x, conv.weight[:12], None, padding=1, groups=12)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    conv(x).sum().backward()
    assert _grad_outside(conv.weight, 12) == 0


def test_slim_linear_and_conv_transpose_equal_plain_layers():
    torch.manual_seed(0)
    seq = _slim(nn.Sequential(nn.Linear(40, 24), nn.ConvTranspose2d(8, 12, 2, stride=2)))
    lin, deconv = seq
    assert isinstance(lin, SlimLinear) and isinstance(deconv, SlimConvTranspose2d)
    lin.width = deconv.width = 0.5
    x = torch.randn(3, 20)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight[:12, :20], lin.bias[:12]))
    z = torch.randn(1, 4, 5, 5)
    ref = F.conv_transpose2d(z, deconv.weight[:4, :8], deconv.bias[:8], stride=2)
    torch.testing.assert_close(deconv(z), ref)
    deconv(z).sum().backward()
    assert _grad_outside(deconv.weight, 4, 8) == 0


def _cached(layer):
    return layer.__dict__.get(CACHED_WEIGHT, (None, None))[1]


def test_inference_weight_slice_is_cached_and_follows_every_change():
    torch.manual_seed(0)
    conv = _slim(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)))[0].eval()
    x = torch.randn(1, 8, 7, 7)

    def reference(x=x):
        out = conv.active_out(32)
        return F.conv2d(x, conv.weight[:out, :8], conv.bias[:out], padding=1)

    conv.width = 0.5
    with torch.no_grad():
        assert torch.equal(conv(x), reference())
        cached = _cached(conv)
        assert cached.is_contiguous() and cached.shape == (16, 8, 3, 3)
        conv(x)
        assert _cached(conv) is cached  # reused, not copied again
        conv.width = 0.25  # another slice
        assert torch.equal(conv(x), reference()) and _cached(conv).shape == (8, 8, 3, 3)
        conv.weight.mul_(2.0)  # an in-place change (an optimizer step, torch.nn.init)
        assert torch.equal(conv(x), reference())
        conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
        assert torch.equal(conv(x), reference())
    conv.double()  # a new weight tensor
    x = x.double()
    with torch.no_grad():
        assert torch.equal(conv(x), reference(x)) and _cached(conv).dtype == torch.float64
    # With gradients on, the slice itself runs, so that the weight gets its gradient.
    y = conv(x)
    y.sum().backward()
    assert conv.weight.grad[:8, :8].abs().sum() > 0
    conv.train()
    assert CACHED_WEIGHT not in conv.__dict__  # back to training: the copy is dropped
    with torch.no_grad():
        conv(x)
    assert CACHED_WEIGHT not in conv.__dict__  # training mode keeps none


def test_traced_slim_conv_slices_its_weight():
    conv = _slim(nn.Sequential(nn.Conv2d(16, 32, 3)))[0].eval()
    conv.width = 0.5
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(conv, x, check_trace=False)
    assert CACHED_WEIGHT not in conv.__dict__
    assert "aten::slice" in str(traced.graph)  # the weight, sliced: it follows later changes
    with torch.no_grad():
        conv.weight.add_(1.0)
        assert torch.equal(traced(x), conv(x))


def test_full_width_and_output_only_slices_need_no_copy():
    conv = _slim(nn.Sequential(nn.Conv2d(16, 32, 1)))[0].eval()
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias))  # width 1: the weight
        assert CACHED_WEIGHT not in conv.__dict__
        conv.width = 0.5
        out = conv.active_out(32)
        # All input channels: the slice is contiguous, kept as a view of the weight (no copy).
        assert torch.equal(conv(x), F.conv2d(x, conv.weight[:out], conv.bias[:out]))
        kept = _cached(conv)
        assert kept.shape == (out, 16, 1, 1) and kept.data_ptr() == conv.weight.data_ptr()
        conv.weight.add_(1.0)  # the view sees it; the next call re-checks the version anyway
        assert torch.equal(conv(x), F.conv2d(x, conv.weight[:out], conv.bias[:out]))


def test_slim_layers_at_full_width_run_no_slicing_op():
    convs = _slim(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 8, 1)))
    x = torch.randn(1, 16, 6, 6)
    for grad in (False, True):  # eval, and training (autograd), both pass the weight itself
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            convs[1](convs[0](x))
        ops = [e.key for e in prof.key_averages()]
        assert "aten::slice" not in ops and "aten::conv2d" in ops, ops


def test_conv_transpose_caches_its_inference_slice():
    torch.manual_seed(0)
    deconv = _slim(nn.Sequential(nn.ConvTranspose2d(8, 12, 2, stride=2)))[0].eval()
    deconv.width = 0.5
    z = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        y = deconv(z)
        assert _cached(deconv) is not None
        assert torch.equal(y, F.conv_transpose2d(z, deconv.weight[:4, :8], deconv.bias[:8],
                                                 stride=2))
        assert torch.equal(deconv(z), y)


def test_keep_out_layer_keeps_full_output():
    head = _slim(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 5, 1)), keep_out=("1",))
    slim_det.set_width(head, 0.5)
    assert head(torch.randn(1, 8, 4, 4)).shape[1] == 5


def test_too_wide_input_is_a_clear_error():
    conv = _slim(nn.Sequential(nn.Conv2d(4, 8, 1)))[0]
    with pytest.raises(ValueError, match="4 input channels at full width but received 6"):
        conv(torch.randn(1, 6, 2, 2))


def test_grouped_conv_is_rejected():
    with pytest.raises(ValueError, match="grouped conv"):
        _slim(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2)))


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "SyncBN", "GN"])
def test_every_norm_builds_and_runs_at_every_width(norm):
    torch.manual_seed(0)
    block = _slim(nn.Sequential(Conv2d(8, 64, 3, padding=1, norm=get_norm(norm, 64))))
    conv = block[0]
    for width in WIDTHS:
        slim_det.set_width(block, width)
        channels = slim_det.active_channels(64, width, 4)
        for mode in (True, False):
            block.train(mode)
            y = block(torch.randn(2, int(8 * width) or 1, 5, 5))
            assert y.shape == (2, channels, 5, 5)
            assert torch.isfinite(y).all()
    if norm == "GN":
        assert isinstance(conv.norm, SlimGroupNorm)
    else:
        assert isinstance(conv.norm, SwitchableNorm)
        expected = {"w0_25": 16, "w0_5": 32, "w0_75": 48}
        assert {k: v.num_features for k, v in conv.norm.private.items()} == expected


def test_switchable_bn_keeps_private_statistics():
    torch.manual_seed(0)
    seq = _slim(nn.Sequential(nn.BatchNorm2d(16)))
    bn = seq[0]
    before = bn.running_mean.clone()
    slim_det.set_width(seq, 0.5)
    seq.train()
    seq(torch.randn(4, 8, 3, 3) + 5)
    assert torch.equal(bn.running_mean, before)  # the full-width statistics are untouched
    assert bn.private["w0_5"].running_mean.mean() > 0.4


def test_unknown_width_names_the_allowed_widths():
    seq = _slim(nn.Sequential(nn.BatchNorm2d(16)))
    slim_det.set_width(seq, 0.6)
    with pytest.raises(ValueError, match=r"Width 0.6 has no private norm.*\[0.25, 0.5, 0.75, 1.0\]"):
        seq(torch.randn(1, 8, 2, 2))


def test_evaluation_runs_the_width_s_own_norm_and_refuses_what_it_cannot_run():
    torch.manual_seed(0)
    bn = _slim(nn.Sequential(nn.BatchNorm2d(16)))[0]
    for private in bn.private.values():  # statistics of their own, told apart from the full norm's
        private.running_mean.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                               bn.bias, False, 0.0, bn.eps))
        slim_det.set_width(bn, 0.5)
        assert torch.equal(bn(x[:, :8]), bn.private["w0_5"](x[:, :8]))
        with pytest.raises(ValueError, match="at width 0.5 expects 8 channels, got 16"):
            bn(x)
        bn.missing_stats.add("w0_5")  # a checkpoint without this width's statistics
        with pytest.raises(ValueError, match="Width 0.5"):
            bn(x[:, :8])


def test_group_norm_keeps_group_size():
    gn = _slim(nn.Sequential(nn.GroupNorm(8, 64)))[0]
    x = torch.randn(2, 16, 3, 3)
    ref = F.group_norm(x, 2, gn.weight[:16], gn.bias[:16], gn.eps)
    torch.testing.assert_close(gn(x), ref)
    assert gn.groups_for(64) == 8 and gn.groups_for(12) == 4  # gcd fallback


def test_private_norms_start_from_the_full_norm_sliced():
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.copy_(torch.arange(16.0))
        bn.running_var.copy_(torch.arange(16.0) + 1)
    _slim(nn.Sequential(bn))
    assert torch.equal(bn.private["w0_25"].weight, torch.arange(4.0))
    assert torch.equal(bn.private["w0_75"].running_var, torch.arange(12.0) + 1)


def test_stock_state_dict_fills_private_norms():
    stock = nn.Sequential(FrozenBatchNorm2d(16))
    stock[0].weight.copy_(torch.linspace(1, 2, 16))
    slim = _slim(nn.Sequential(FrozenBatchNorm2d(16)))
    result = slim.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(slim[0].private["w0_5"].weight, torch.linspace(1, 2, 16)[:8])


def test_naive_sync_bn_private_norms_keep_kind():
    seq = _slim(nn.Sequential(NaiveSyncBatchNorm(16)))
    assert all(type(p) is NaiveSyncBatchNorm for p in seq[0].private.values())
