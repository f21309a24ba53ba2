"""Property of every algorithm at every bit width: the integer codes lie in the grid's range, a group uses
at most 2^bits levels, the dequantized codes are the layer's fake-quant weight, and packing round-trips."""
from __future__ import annotations

import pytest
import torch

from llmc.config import parse_config
from llmc.export.packing import pack_int32, unpack_int32
from llmc.models import load_adapter
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import dequantize, qrange
from llmc.runner import quantize_model

METHODS = {"RTN": {}, "AWQ": {"n_grid": 4, "clip_grid": 4}, "GPTQ": {},
           "GPTQ-actorder": {"actorder": True}, "SmoothQuant": {"alpha": 0.5}}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_codes_in_range_and_packable(tiny_model, calib_dir, tmp_path, method, bits, symmetric):
    quant = {"method": method.split("-")[0], "quant_objects": ["vision", "language"],
             "weight": {"bit": bits, "symmetric": symmetric, "group_size": 32}, "special": METHODS[method]}
    if method == "SmoothQuant":
        quant["act"] = {"bit": 8}
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
                        "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2},
                        "quant": quant, "save": {"save_path": str(tmp_path / "out")}})
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    layers = [m for m in adapter.model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == 22  # 2 vision blocks x 4 linears + 2 language blocks x 7
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)  # by hand
    assert qrange(bits, symmetric) == (qmin, qmax)
    for m in layers:
        q = m.int_weight()
        assert qmin <= int(q.min()) and int(q.max()) <= qmax, (m.layer.name, int(q.min()), int(q.max()))
        groups = q.reshape(q.shape[0], -1, 32) if m.g_idx is None else None
        if groups is not None:
            levels = max(len(torch.unique(g)) for g in groups.reshape(-1, 32))
            assert levels <= 2 ** bits
        torch.testing.assert_close(dequantize(q, m.scale, m.zero, m.g_idx), m.quantized_weight().float(),
                                   rtol=0, atol=1e-6)
        if 32 % bits == 0:
            u = q - qmin  # unsigned grid 0 .. 2^bits - 1
            assert torch.equal(unpack_int32(pack_int32(u, bits), bits), u)
