"""Data-based pi-ID (PIFLOW.md §3.1): per-sample segments drawn with probability equal to their length, keyed
by the global sample index; x_src = (1 - sigma_src) x0 + sigma_src eps; the Gaussian-data oracle gives loss 0
for per-sample different segments and the teacher is only queried inside each sample's own segment."""
import torch

from models.piid import DataSegments, data_iteration, data_x_src
from models.timesteps import sample_segment_of, warp
from tests.models.test_piid import F64, SHIFT, GaussianData, RecordingTeacher, params

# chi-square critical values at p = 0.001 for 1 and 3 degrees of freedom
CHI2_CRIT = {1: 10.828, 3: 16.266}


def _chi_square(nfe, f, n=8000, seed=3):
    b = 1 / (nfe - 1 + f)
    starts = torch.tensor([(j - 1 + f) * b for j in range(1, nfe + 1)], dtype=F64)
    lengths = torch.tensor([f * b] + [b] * (nfe - 1), dtype=F64)
    draws = torch.tensor([sample_segment_of(seed, i, nfe, f) for i in range(n)], dtype=F64)  # (n, 2)
    which = (draws[:, 0:1] - starts[None]).abs().argmin(1)
    assert torch.allclose(draws[:, 0], starts[which], atol=1e-15, rtol=0)  # on a segment start ...
    assert torch.allclose(draws[:, 1], lengths[which], atol=1e-15, rtol=0)  # ... with that segment's length
    observed = torch.bincount(which, minlength=nfe).double()
    expected = n * lengths
    return float(((observed - expected) ** 2 / expected).sum()), observed / n


def test_segment_of_sample_index_follows_segment_lengths_chi_square():
    chi2, freq = _chi_square(4, 0.5)  # probabilities 1/7, 2/7, 2/7, 2/7 (last segment first)
    assert chi2 < CHI2_CRIT[3], (chi2, freq)
    assert abs(float(freq[0]) - 1 / 7) < 0.015
    chi2, _ = _chi_square(2, 1.0)  # ImageNet 2-NFE: 1/2 each
    assert chi2 < CHI2_CRIT[1]
    # a biased sampler (uniform over segments) fails the same test: the test can fail
    uniform = torch.bincount(torch.arange(20000) % 4, minlength=4).double()
    expected = 20000 * torch.tensor([1 / 7, 2 / 7, 2 / 7, 2 / 7], dtype=F64)
    assert float(((uniform - expected) ** 2 / expected).sum()) > CHI2_CRIT[3]


def test_segment_of_sample_is_a_function_of_seed_and_index():
    a = [sample_segment_of(5, i, 4, 0.5) for i in range(200)]
    assert a == [sample_segment_of(5, i, 4, 0.5) for i in range(200)]
    assert a != [sample_segment_of(6, i, 4, 0.5) for i in range(200)]
    assert len(set(a)) == 4  # all four segments occur
    assert sample_segment_of(0, 0, 1, 1.0) == (1.0, 1.0)  # 1 NFE: always the whole trajectory


def test_x_src_formula_per_sample():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    got = data_x_src(x0, eps, sigma)
    for i in range(3):  # independent reference, one sample at a time in float64
        ref = (1 - float(sigma[i])) * x0[i].double() + float(sigma[i]) * eps[i].double()
        assert torch.allclose(got[i].double(), ref, atol=1e-6, rtol=0)
    assert torch.equal(got[0], eps[0]) and got.dtype == torch.float32


def test_data_iteration_gaussian_oracle_loss_zero_and_queries_inside_each_segment():
    data = GaussianData()
    g = torch.Generator().manual_seed(4)
    B = 4
    x0 = data.mu_d + data.s_d * torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    noise = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    segs = [sample_segment_of(0, i, 4, 0.5) for i in (0, 1, 2, 5)]
    tau_src = torch.tensor([s[0] for s in segs], dtype=F64)
    segment = torch.tensor([s[1] for s in segs], dtype=F64)
    assert len(set(tau_src.tolist())) > 1  # per-sample different segments in one batch
    seen = {}

    def make_policy(x_src, sigma_src):
        seen["x_src"], seen["sigma_src"] = x_src, sigma_src
        return data.exact_policy(x_src, sigma_src)

    teacher = RecordingTeacher(data)
    out = list(data_iteration(make_policy, teacher, noise, DataSegments(x0, tau_src, segment), None,
                              params(num_intermediate=3), 0.0, torch.Generator().manual_seed(5)))
    assert len(out) == 1
    loss, metrics = out[0]
    assert loss.item() < 1e-20 and metrics["u_teacher_rms"] > 0.1  # the exact posterior policy imitates exactly
    sigma_src = warp(tau_src, SHIFT)
    assert torch.allclose(seen["sigma_src"], sigma_src, atol=1e-15, rtol=0)
    ref = (1 - sigma_src.reshape(B, 1, 1, 1)) * x0 + sigma_src.reshape(B, 1, 1, 1) * noise
    assert torch.allclose(seen["x_src"], ref, atol=1e-14, rtol=0)
    lo = warp((tau_src - segment).clamp(min=0), SHIFT)
    assert len(teacher.calls) == 1  # r = 0: every query of the segment in one call, row i*B + b
    for sigma in teacher.calls[0][1].view(3, B):  # every query of sample b lies in its own segment
        assert torch.all(sigma <= sigma_src + 1e-12) and torch.all(sigma >= lo - 1e-12)
    # the exact policy of other data (wider spread) gives a positive loss: the oracle test can fail
    other = GaussianData(s_d=0.9)
    out = list(data_iteration(other.exact_policy, RecordingTeacher(data), noise,
                              DataSegments(x0, tau_src, segment), None, params(), 0.0,
                              torch.Generator().manual_seed(5)))
    assert out[0][0].item() > 1e-4
