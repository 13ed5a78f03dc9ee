// vitlab::scan_d1: the S6 scan with d_state = 1 (MSVMamba's) in one pass, for CPU inference; built by
// torch.utils.cpp_extension from fast/scan.py, which also gives the op its fake (tracing) and FLOP formulas.
//
// For each step s, with r = in_rows[s], o = out_rows[s] and x_r = proj[r] (dt's low-rank input of `rank`
// values, then B, then C):
//   dt = softplus(bias + x_r[:rank] @ W),  h = exp(dt * A) * h + dt * B * u[r],  out[o] += norm(C * h + D * u[r]),
// norm being a LayerNorm over the channels (norm_weight, norm_bias, eps) or none. u and out are rows of
// `batch * dim` floats, proj rows of `batch * (rank + 2)`, channels innermost. Lanes (image, channel) are
// independent and the sequence is serial: each thread takes a range of lanes (whole images when normalising),
// and the inner loops run over a step's contiguous channels and vectorise (the rank-sized dt product included,
// so the full-size dt is never written out). Accumulating lets the half-scale routes sum onto their pixels and
// the full scale add onto the upsampled branch. softplus is x above 20, as torch's; below, log1p(e^x) is
// log(1 + e) with its rounding corrected, since glibc's vector log1pf is 5x slower than its logf (the
// correction needs -fno-associative-math, which keeps the vector expf/logf of -ffast-math).
//
// Only the ATen headers it uses (not <torch/extension.h>, which pulls in pybind11 and all of libtorch's API):
// the first build is then a few seconds shorter. Inference only: the op has no autograd formula.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <math.h>  // the C expf/logf, which glibc declares vectorisable under -ffast-math

#include <algorithm>
#include <optional>
#include <vector>

namespace {

struct ScanArgs {
  const float *proj, *u, *W, *bias, *A, *D, *ln_w, *ln_b;
  const int64_t *in_rows, *out_rows;
  int64_t steps, batch, dim, rank;
  float eps;
  float* y;
};

// Lanes [lane_lo, lane_hi) of batch * dim; h: 3 * dim floats of scratch (state, dt inputs, outputs of a step).
void scan_lanes(const ScanArgs& a, int64_t lane_lo, int64_t lane_hi, float* __restrict__ h) {
  const int64_t dim = a.dim, batch = a.batch, rank = a.rank;
  const float *__restrict__ W = a.W, *__restrict__ bias = a.bias, *__restrict__ A = a.A, *__restrict__ D = a.D;
  const float *__restrict__ ln_w = a.ln_w, *__restrict__ ln_b = a.ln_b;
  float *__restrict__ xs = h + dim, *__restrict__ ys = h + 2 * dim;
  for (int64_t b = lane_lo / dim; b < batch && b * dim < lane_hi; ++b) {
    const int64_t c0 = lane_lo > b * dim ? lane_lo - b * dim : 0;
    const int64_t c1 = lane_hi < (b + 1) * dim ? lane_hi - b * dim : dim;
    for (int64_t c = c0; c < c1; ++c) h[c] = 0.0f;
    for (int64_t s = 0; s < a.steps; ++s) {
      const int64_t r = a.in_rows[s] * batch + b, o = a.out_rows[s] * batch + b;
      const float *__restrict__ up = a.u + r * dim, *__restrict__ xr = a.proj + r * (rank + 2);
      float* __restrict__ yp = a.y + o * dim;
      const float Bs = xr[rank], Cs = xr[rank + 1];
      for (int64_t c = c0; c < c1; ++c) xs[c] = bias[c];
      for (int64_t k = 0; k < rank; ++k)  // dt's pre-activation, in cache
        for (int64_t c = c0; c < c1; ++c) xs[c] += xr[k] * W[k * dim + c];
#pragma GCC ivdep  // channels are independent: without it a runtime alias check picks the scalar loop
      for (int64_t c = c0; c < c1; ++c) {
        const float x = xs[c], e = expf(x), t = 1.0f + e;
        const float dt = x > 20.0f ? x : logf(t) + (e - (t - 1.0f)) / t;  // log1p(e), compensated
        h[c] = expf(dt * A[c]) * h[c] + dt * Bs * up[c];
        ys[c] = Cs * h[c] + D[c] * up[c];
      }
      if (ln_w == nullptr) {
        for (int64_t c = c0; c < c1; ++c) yp[c] += ys[c];
        continue;
      }
      float mean = 0.0f, var = 0.0f;  // whole image: c0 = 0, c1 = dim
#pragma omp simd reduction(+ : mean)
      for (int64_t c = 0; c < dim; ++c) mean += ys[c];
      mean /= static_cast<float>(dim);
#pragma omp simd reduction(+ : var)
      for (int64_t c = 0; c < dim; ++c) var += (ys[c] - mean) * (ys[c] - mean);
      const float rstd = 1.0f / sqrtf(var / static_cast<float>(dim) + a.eps);
#pragma GCC ivdep
      for (int64_t c = 0; c < dim; ++c) yp[c] += (ys[c] - mean) * rstd * ln_w[c] + ln_b[c];
    }
  }
}

void check_rows(const at::Tensor& rows, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.is_contiguous(),
                    "scan_d1's ", name, " must be a contiguous CPU int64 tensor");
  const int64_t* p = rows.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(p, p + rows.numel());
  TORCH_CHECK_VALUE(rows.numel() == 0 || (*lo >= 0 && *hi < n), name, " must lie in [0, ", n, ")");
}

void scan_d1(const at::Tensor& proj, const at::Tensor& u, const at::Tensor& W, const at::Tensor& bias,
             const at::Tensor& A, const at::Tensor& D, const at::Tensor& in_rows, const at::Tensor& out_rows,
             const at::Tensor& out, const std::optional<at::Tensor>& norm_weight,
             const std::optional<at::Tensor>& norm_bias, double eps) {
  TORCH_CHECK_VALUE(u.dim() == 3 && W.dim() == 2, "scan_d1 expects u (P, B, d) and W (rank, d), got u ",
                    u.sizes(), ", W ", W.sizes());
  const int64_t P = u.size(0), batch = u.size(1), dim = u.size(2), rank = W.size(0);
  TORCH_CHECK_VALUE(proj.sizes() == at::IntArrayRef({P, batch, rank + 2}) && W.size(1) == dim &&
                        bias.sizes() == at::IntArrayRef({dim}) && A.sizes() == bias.sizes() &&
                        D.sizes() == bias.sizes(),
                    "scan_d1 expects u (P, B, d), proj (P, B, rank + 2), W (rank, d), bias, A and D (d,); got u ",
                    u.sizes(), ", proj ", proj.sizes(), ", W ", W.sizes(), ", bias ", bias.sizes(), ", A ",
                    A.sizes(), ", D ", D.sizes());
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(1) == batch && out.size(2) == dim && in_rows.dim() == 1 &&
                        in_rows.sizes() == out_rows.sizes(),
                    "scan_d1 expects out (Q, ", batch, ", ", dim, ") and in_rows, out_rows of one length; got out ",
                    out.sizes(), ", in_rows ", in_rows.sizes(), ", out_rows ", out_rows.sizes());
  TORCH_CHECK_VALUE(norm_weight.has_value() == norm_bias.has_value(), "scan_d1's norm needs a weight and a bias");
  const bool normed = norm_weight.has_value();
  std::vector<at::Tensor> inputs = {proj, u, W, bias, A, D};
  if (normed) {
    TORCH_CHECK_VALUE(norm_weight->sizes() == bias.sizes() && norm_bias->sizes() == bias.sizes(),
                      "scan_d1's norm weight and bias must be (", dim, ",), got ", norm_weight->sizes(), ", ",
                      norm_bias->sizes());
    inputs.insert(inputs.end(), {*norm_weight, *norm_bias});
  }
  bool records = false;
  for (const auto& t : inputs) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                      "scan_d1 runs on contiguous CPU float32 tensors");
    TORCH_CHECK_VALUE(!t.is_alias_of(out), "scan_d1's out must not share memory with its inputs");
    records |= t.requires_grad();
  }
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "scan_d1 runs on contiguous CPU float32 tensors");
  TORCH_CHECK(!((records || out.requires_grad()) && c10::GradMode::is_enabled()),
              "vitlab::scan_d1 is inference only (it has no backward): call it under torch.no_grad()");
  check_rows(in_rows, "in_rows", P);
  check_rows(out_rows, "out_rows", out.size(0));

  const int64_t steps = in_rows.numel();
  // at least 64 lanes (8 vectors) per thread; with a norm, whole images per thread
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch * dim / 64));
  if (normed && threads > batch) {  // fewer images than threads: split channels, normalise after
    const at::Tensor raw = at::zeros({steps, batch, dim}, u.options());
    scan_d1(proj, u, W, bias, A, D, in_rows, at::arange(steps, in_rows.options()), raw, std::nullopt,
            std::nullopt, 0.0);
    out.index_add_(0, out_rows, at::layer_norm(raw, {dim}, *norm_weight, *norm_bias, eps));
    return;
  }
  const ScanArgs a{proj.data_ptr<float>(),
                   u.data_ptr<float>(),
                   W.data_ptr<float>(),
                   bias.data_ptr<float>(),
                   A.data_ptr<float>(),
                   D.data_ptr<float>(),
                   normed ? norm_weight->data_ptr<float>() : nullptr,
                   normed ? norm_bias->data_ptr<float>() : nullptr,
                   in_rows.data_ptr<int64_t>(),
                   out_rows.data_ptr<int64_t>(),
                   steps,
                   batch,
                   dim,
                   rank,
                   static_cast<float>(eps),
                   out.data_ptr<float>()};
  const int64_t units = normed ? batch : batch * dim, unit = normed ? dim : 1;
  std::vector<float> scratch(3 * dim * threads);  // allocated before anything is written to out
  // torch's own thread pool (its OpenMP runtime: the library links the libgomp.so.1 torch has loaded)
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      scan_lanes(a, units * i / threads * unit, units * (i + 1) / threads * unit, scratch.data() + 3 * dim * i);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitlab, m) {
  m.def(
      "scan_d1(Tensor proj, Tensor u, Tensor W, Tensor bias, Tensor A, Tensor D, Tensor in_rows, Tensor out_rows, "
      "Tensor(a!) out, Tensor? norm_weight=None, Tensor? norm_bias=None, float eps=1e-05) -> ()");
}

TORCH_LIBRARY_IMPL(vitlab, CPU, m) { m.impl("scan_d1", &scan_d1); }
