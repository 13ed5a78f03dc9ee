"""SVT-H: which counting basis the paper's parameter and FLOP figures are on (issue 3).

The paper's SVT-H-S/B/L GFLOPs (3.9, 6.3, 12.7) are SpectFormer-H-S/B/L's published figures: a module-hook
counter (the official ``util/flops_counter.py``) sees only ``nn.Linear`` / ``nn.Conv2d`` modules, not the
attention products, the Einstein products or the DTCWT's functional convolutions, and it reproduces them for
SVT-H only with the scattering mixer in two stages (as SpectFormer-H's spectral stages), not in the one stage
of the official ``svt_s/b/l`` (``alpha = 1``) that the registered variants build.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.models.svt import PAPER_GMACS


def _module_hook_gmacs(name: str, **kwargs) -> float:
    """GMACs of Linear and Conv2d modules only: torch's count less matrix products and the DTCWT's filters."""
    with torch.device("meta"):
        model = vitlab.create_model(name, **kwargs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    ops = counter.get_flop_counts()["Global"]
    functional = [op for op in ops if any(s in str(op) for s in ("bmm", "scaled_dot", "band_matmul"))]
    assert len(functional) >= 2, "expected attention / Einstein products and the DTCWT in the count"
    return (sum(ops.values()) - sum(ops[op] for op in functional)) / 2e9


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_paper_gmacs_are_the_module_hook_count_of_two_scattering_stages(name):
    assert _module_hook_gmacs(name, num_scatter_stages=2) == pytest.approx(PAPER_GMACS[name], rel=0.01)
    # the official one-stage configuration costs more on the same basis (attention linears in stage 2)
    assert _module_hook_gmacs(name) > 1.03 * PAPER_GMACS[name]


def test_large_params_match_the_paper_without_the_token_labelling_head():
    # S and B's figures (22.0M, 32.8M) include the aux head and are checked in test_parity; L's 54.0M does not
    with torch.device("meta"):
        model = vitlab.create_model("svt_h_l", use_aux_head=False)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(54.0, rel=0.01)
