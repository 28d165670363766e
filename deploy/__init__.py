"""Deployment: what runs a trained model on new images, used by inference.py and export.py.

- :mod:`deploy.onnx_model`: export to a self-describing ONNX file.
- :mod:`deploy.quantize`: int8 post-training quantization of that file.
- :mod:`deploy.engines`: the runtimes (PyTorch, onnxruntime, OpenVINO).
- :mod:`deploy.predictor`: load a checkpoint or ONNX file and predict class ids (batches,
  windows, scales, flips), usable from Python without a command line.
- :mod:`deploy.outputs`: what is written for each input (mask, colours, overlay) and the writer.
- :mod:`deploy.cache`: what a later run reuses (the exported graph, OpenVINO's compiled model).

Training never imports this package.
"""
