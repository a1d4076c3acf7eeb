"""A tiny MXFP4 quantiser: GPT-OSS expert tensors -> the hub's `*_blocks` / `*_scales` layout.

Only for tests and offline trials (the converter never writes MXFP4; `checkpoint_convert/mxfp4.py`
documents the layout and why). Per block of 32 input elements of one expert's output row, the shared
scale is the smallest power of two that fits the block's max |w| into e2m1's range (6), and every
element rounds to the nearest e2m1 value (ties to the lower magnitude).

    python tools/mxfp4_quantize.py --hf /tmp/tiny_gpt_oss --out /tmp/tiny_gpt_oss_mxfp4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

BLOCK = 32
MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
QUANTIZED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantize(w_ECR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical `[E, cols, rows]` weights (cols a multiple of 32) -> (blocks [E, rows, cols/32, 16],
    scales [E, rows, cols/32]), both uint8."""
    num_experts, cols, rows = w_ECR.shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input dim ({cols}) to be a multiple of {BLOCK}")
    blocks_ERGK = w_ECR.float().transpose(1, 2).reshape(num_experts, rows, cols // BLOCK, BLOCK)
    amax = blocks_ERGK.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / 6.0)).clamp(-127, 127)
    scaled = blocks_ERGK / torch.exp2(exponent).unsqueeze(-1)
    magnitude_code = (scaled.abs().unsqueeze(-1) - MAGNITUDES).abs().argmin(dim=-1)
    codes = magnitude_code | ((scaled < 0).long() << 3)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.to(torch.uint8), (exponent + 127).to(torch.uint8)


def quantize_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a (single-file) GPT-OSS directory with its expert weights in MXFP4, as on the hub."""
    from safetensors.torch import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    shutil.copytree(hf_dir, out_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(QUANTIZED)]:
        blocks, scales = quantize(tensors.pop(name))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True, help="a GPT-OSS directory (one safetensors file)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(quantize_checkpoint(args.hf, args.out))


if __name__ == "__main__":
    main()
