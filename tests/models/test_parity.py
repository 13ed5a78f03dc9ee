"""Every reference variant's parameter count (1%) and GMACs (5%) against its paper table, on the meta device."""

import pytest

import vitlab
from vitlab.bench import count_flops_meta, count_params_meta, gmacs

REFERENCE = [name for name in vitlab.list_models() if vitlab.get_variant(name).ref_params_m is not None]
WITH_GMACS = [name for name in REFERENCE if vitlab.get_variant(name).ref_gmacs is not None]


@pytest.mark.parametrize("name", REFERENCE)
def test_params_match_paper(name):
    spec = vitlab.get_variant(name)
    params_m = count_params_meta(name) / 1e6
    # 1%, or the rounding of the paper's table where that is coarser (Swin-T: "28M" for 28.29M)
    tolerance = max(0.01 * spec.ref_params_m, spec.ref_params_rounding / 2)
    assert params_m == pytest.approx(spec.ref_params_m, abs=tolerance), f"{name}: {params_m:.2f}M vs {spec.ref_source}"


@pytest.mark.parametrize("name", WITH_GMACS)
def test_gmacs_match_paper(name):
    spec = vitlab.get_variant(name)
    macs = gmacs(count_flops_meta(name, img_size=spec.img_size))
    assert macs == pytest.approx(spec.ref_gmacs, rel=0.05), f"{name}: {macs:.2f} GMACs vs {spec.ref_source}"
