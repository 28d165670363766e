"""The decoder with weights set by hand: its logits are worked out from the inputs, so the
order of the concatenation (ASPP output first, then the reduced low-level features, as the
paper's figure and the converted jfzhang95 weights have it) is pinned."""
from __future__ import annotations

import torch
from torch import nn

from modeling.decoder import Decoder


def identity_batch_norm(norm: nn.BatchNorm2d) -> None:
    """Eval-mode BN that returns its input exactly: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0."""
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    norm.running_mean.zero_()
    norm.running_var.fill_(1 - norm.eps)


def hand_decoder() -> Decoder:
    """One ASPP channel, one low-level channel, two classes; every weight zero but these:

    - low-level reduction: reduced channel 0 = 2 * low, reduced channel 1 = -low (ReLU -> 0);
    - both 3x3 convs: centre tap 1 from input channel k to output channel k (k = 0, 1, 2), so
      after them channel 0 is the concatenation's channel 0 and channel 1 its channel 1;
    - classifier: class 0 = ch0 + 0.5 ch1 + 0.1, class 1 = -ch0 + 3 ch1 - 0.2.
    """
    decoder = Decoder(low_level_channels=1, num_classes=2, aspp_channels=1).double().eval()
    for parameter in decoder.parameters():
        nn.init.zeros_(parameter)
    for module in decoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            identity_batch_norm(module)
    with torch.no_grad():
        reduce = decoder.reduce_low_level[0].weight  # (48, 1, 1, 1)
        reduce[0, 0, 0, 0], reduce[1, 0, 0, 0] = 2.0, -1.0
        for conv in (decoder.refine[0], decoder.refine[4]):
            for channel in range(3):
                conv.weight[channel, channel, 1, 1] = 1.0
        decoder.classifier.weight[0, :2, 0, 0] = torch.tensor([1.0, 0.5])
        decoder.classifier.weight[1, :2, 0, 0] = torch.tensor([-1.0, 3.0])
        decoder.classifier.bias.copy_(torch.tensor([0.1, -0.2]))
    return decoder


def test_decoder_logits_with_hand_set_weights():
    aspp = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]], dtype=torch.float64)
    low = torch.tensor([[[[0.5, 1.0, 0.0], [2.0, 0.25, 1.0]]]], dtype=torch.float64)
    logits = hand_decoder()(aspp, low)
    # Concatenation [ASPP, reduced low-level]: ch0 = aspp, ch1 = 2 low, so
    # class 0 = aspp + 0.5 * 2 low + 0.1 and class 1 = -aspp + 3 * 2 low - 0.2.
    expected = torch.tensor([[[[1.6, 3.1, 3.1], [6.1, 5.35, 7.1]],
                              [[1.8, 3.8, -3.2], [7.8, -3.7, -0.2]]]], dtype=torch.float64)
    torch.testing.assert_close(logits, expected)


def test_decoder_upsamples_the_aspp_output_to_the_low_level_size():
    # A 1x1 ASPP output (image pooling alone, say) becomes a constant map of the low-level size.
    aspp = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    low = torch.tensor([[[[1.0, 0.0], [0.5, 3.0], [2.0, 1.5]]]], dtype=torch.float64)
    logits = hand_decoder()(aspp, low)
    expected = torch.stack([2.0 + low[0, 0] + 0.1, -2.0 + 6 * low[0, 0] - 0.2])[None]
    assert logits.shape == (1, 2, 3, 2)
    torch.testing.assert_close(logits, expected)

