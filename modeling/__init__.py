"""DeepLabV3+ model: backbones (``modeling.backbone``), ASPP, decoder, ``modeling.deeplab.DeepLab``.

Knows tensors, plus the two files a model is made from: the pretrained weights a backbone starts
from (``modeling.backbone``, ``modeling.pretrained``) and the checkpoint a trained model is rebuilt
from (``modeling.checkpoint.load_model``, the one way from a checkpoint to a model). Flags and
datasets belong to the scripts and ``dataloader``.
"""
