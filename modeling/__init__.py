"""DeepLabV3+ model: backbones (``modeling.backbone``), ASPP, decoder, ``modeling.deeplab.DeepLab``.

Knows tensors only; files, flags and datasets belong to the scripts and ``dataloader``.
"""
