"""The one tolerance table for numerical comparisons (DESIGN.md section 6).

Use ``torch.testing.assert_close(a, b, **TOLERANCES[dtype])``; a test that needs looser
bounds says why in a comment next to the relaxation.
"""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
