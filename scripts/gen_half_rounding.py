"""Records torch's f32 -> bf16 and f32 -> f16 rounding, and its bf16/f16 -> f32 widening, for
the conversion tests of tests/mixed.rs (`torch_rounding_matches`).

Writes tests/data/half_rounding_torch.json:
  * "f32": f32 bit patterns: every edge case of the rounding (signed zeros, the subnormal range,
    ties with an even and an odd kept bit, values just around each tie, the largest finite
    values that round to infinity or not, infinities, quiet and signalling NaNs of both signs)
    and 4096 uniformly random bit patterns;
  * "bf16", "f16": `torch.tensor(f32).to(dtype)` bits for each (torch's vectorised CPU
    kernels; a NaN is recorded as whatever torch writes, and the test only checks NaN-ness
    there: torch itself writes 0x7FC0 in scalar code and 0xFFFF in vector code).

    ../venv/bin/python scripts/gen_half_rounding.py
"""

import json
import os
import random

import torch


def edge_bits():
    out = []
    for sign in (0, 0x8000_0000):
        for b in (
            0x0000_0000, 0x0000_0001, 0x0000_7FFF, 0x0000_8000, 0x0000_8001, 0x0001_8000,
            0x007F_7FFF, 0x007F_8000, 0x007F_FFFF, 0x0080_0000, 0x0080_8000, 0x0081_8000,
            0x3F80_0000, 0x3F80_7FFF, 0x3F80_8000, 0x3F80_8001, 0x3F81_7FFF, 0x3F81_8000,
            0x3F81_8001, 0x3FFF_FFFF, 0x477F_E000, 0x477F_EFFF, 0x477F_F000, 0x4780_0000,
            0x3380_0000, 0x3380_0001, 0x3300_0000, 0x3300_0001, 0x3880_0000, 0x387F_FFFF,
            0x7F7F_0000, 0x7F7F_7FFF, 0x7F7F_8000, 0x7F7F_FFFF, 0x7F80_0000, 0x7F80_0001,
            0x7FA0_0000, 0x7FBF_FFFF, 0x7FC0_0000, 0x7FC0_0001, 0x7FFF_FFFF,
        ):
            out.append(sign | b)
    return out


def main():
    rng = random.Random(15)
    bits = edge_bits() + [rng.getrandbits(32) for _ in range(4096)]
    t = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    bf = t.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    f16 = t.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    out = {
        "torch": torch.__version__,
        "f32": bits,
        "bf16": bf.tolist(),
        "f16": f16.tolist(),
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "half_rounding_torch.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {len(bits)} values to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
