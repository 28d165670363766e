"""``python -m bench.vainf --emulate-avx2``: the AVX2 cap must reach the kernels of both sides,
or the 'AVX2' rows would be this CPU's AVX-512 / AMX speed under another name."""
from __future__ import annotations

import os
import subprocess
import sys

from bench import vainf
from inference_testing import require_deploy

#: Prints PyTorch's kernel level, then the kernel OpenVINO runs an int8 convolution with (the
#: FakeQuantize pairs make it int8, as NNCF's do).
PROBE = r"""
import numpy as np, torch
import openvino as ov
from openvino import opset13 as ops
print(torch.backends.cpu.get_cpu_capability())
def fq(node, low, high, levels=256):
    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(node, lo, hi, lo, hi, levels)
x = ops.parameter([1, 16, 32, 32], np.float32)
w = ops.constant(np.random.default_rng(0).uniform(-1, 1, (16, 16, 3, 3)).astype(np.float32))
conv = ops.convolution(fq(x, 0.0, 2.55), fq(w, -1.27, 1.27, 255), [1, 1], [1, 1], [1, 1], [1, 1])
model = ov.Model([ops.relu(conv)], [x])
compiled = ov.Core().compile_model(model, "CPU", {"PERF_COUNT": "YES",
                                                  "INFERENCE_PRECISION_HINT": "f32"})
request = compiled.create_infer_request()
request.infer({0: np.ones((1, 16, 32, 32), np.float32)})
print(*[i.exec_type for i in request.get_profiling_info() if i.node_type == "Convolution"])
"""


def test_the_avx2_cap_reaches_pytorchs_and_openvinos_kernels():
    require_deploy("openvino")
    env = {**os.environ, **vainf.ISA_CAP}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    capability, convolution = result.stdout.split("\n")[:2]
    assert capability == "AVX2"
    # jit_avx2_I8 here; brgconv_avx512_amx_I8 uncapped on an AMX Xeon
    assert "avx2" in convolution and "I8" in convolution
    assert "avx512" not in convolution and "amx" not in convolution


def test_the_report_names_the_cap(monkeypatch, capsys):
    for name, value in vainf.ISA_CAP.items():
        monkeypatch.setenv(name, value)
    vainf.report({"VainF": [2.0], "fp32": [1.0]}, {}, count=80)
    header = capsys.readouterr().out.strip().splitlines()[0]
    assert "(capped: ONEDNN_MAX_CPU_ISA=AVX2 OV_CPU_MAX_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)" in header
