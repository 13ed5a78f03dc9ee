/* Fused S6 scan with d_state = 1 for CPU inference; built and loaded by scan_cpu.py.
 *
 * One pass per scan: for each step s, with r = in_rows[s] and o = out_rows[s], and x_r = proj[r] the row of
 * the x_proj output (dt's low-rank input of `rank` values, then B, then C),
 *   dt = softplus(bias + x_r[:rank] @ W),  h = exp(dt * A) * h + dt * B * u[r],  y[o] += norm(C * h + D * u[r]),
 * norm being a LayerNorm over the channels (ln_w, ln_b, eps) or, when ln_w is NULL, none. u and y are rows
 * of `batch * dim` floats, proj rows of `batch * (rank + 2)`, channels innermost. Lanes (batch, channel) are
 * independent and the sequence is serial: each thread takes a range of lanes (whole images when normalising),
 * and the inner loops run over a step's contiguous channels and vectorise (the rank-sized dt product
 * included, so the full-size dt is never written out). Accumulating lets the half-scale routes sum onto their
 * pixels and the full scale add onto the upsampled branch. softplus is x above 20, as torch's; below, log1p(e^x)
 * is log(1 + e) with its rounding corrected, since glibc's vector log1pf is 5x slower than its logf (the
 * correction needs -fno-associative-math, which keeps the vector expf/logf of -ffast-math).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *proj, *u, *W, *bias, *A, *D, *ln_w, *ln_b;
    const int64_t *in_rows, *out_rows;
    int64_t steps, batch, dim, rank;
    float eps;
    float *y;
} scan_args;

static void scan_lanes(const scan_args *a, int64_t lane_lo, int64_t lane_hi, float *restrict h) {
    const int64_t dim = a->dim, batch = a->batch, rank = a->rank;
    const float *restrict W = a->W, *restrict bias = a->bias, *restrict A = a->A, *restrict D = a->D;
    const float *restrict ln_w = a->ln_w, *restrict ln_b = a->ln_b;
    float *restrict xs = h + dim, *restrict ys = h + 2 * dim;  // state, dt inputs, outputs of a step
    for (int64_t b = lane_lo / dim; b < batch && b * dim < lane_hi; ++b) {
        const int64_t c0 = lane_lo > b * dim ? lane_lo - b * dim : 0;
        const int64_t c1 = lane_hi < (b + 1) * dim ? lane_hi - b * dim : dim;
        for (int64_t c = c0; c < c1; ++c) h[c] = 0.0f;
        for (int64_t s = 0; s < a->steps; ++s) {
            const int64_t r = a->in_rows[s] * batch + b, o = a->out_rows[s] * batch + b;
            const float *restrict up = a->u + r * dim, *restrict xr = a->proj + r * (rank + 2);
            float *restrict yp = a->y + o * dim;
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
            if (ln_w == NULL) {
                for (int64_t c = c0; c < c1; ++c) yp[c] += ys[c];
                continue;
            }
            float mean = 0.0f, var = 0.0f;  // whole image: c0 = 0, c1 = dim
#pragma omp simd reduction(+ : mean)
            for (int64_t c = 0; c < dim; ++c) mean += ys[c];
            mean /= (float)dim;
#pragma omp simd reduction(+ : var)
            for (int64_t c = 0; c < dim; ++c) var += (ys[c] - mean) * (ys[c] - mean);
            const float rstd = 1.0f / sqrtf(var / (float)dim + a->eps);
#pragma GCC ivdep
            for (int64_t c = 0; c < dim; ++c) yp[c] += (ys[c] - mean) * rstd * ln_w[c] + ln_b[c];
        }
    }
}

/* All lanes, split between `threads` OpenMP threads (torch's own pool: the library links libgomp.so.1, which
 * resolves to the copy torch has loaded, so no second pool competes for the cores); with a norm, whole images
 * per thread (the caller keeps threads <= batch). */
int vitlab_scan_d1(const float *proj, const float *u, const float *W, const float *bias, const float *A,
                   const float *D, const float *ln_w, const float *ln_b, double eps, const int64_t *in_rows,
                   const int64_t *out_rows, int64_t steps, int64_t batch, int64_t dim, int64_t rank, int64_t threads,
                   float *y) {
    const scan_args a = {proj, u, W, bias, A, D, ln_w, ln_b, in_rows, out_rows, steps, batch, dim, rank, (float)eps, y};
    const int64_t units = ln_w == NULL ? batch * dim : batch, unit = ln_w == NULL ? 1 : dim;
    float *scratch = malloc(sizeof(float) * 3 * (size_t)dim * (size_t)threads);  // before any write to y
    if (scratch == NULL) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < threads; ++i)
        scan_lanes(&a, units * i / threads * unit, units * (i + 1) / threads * unit, scratch + 3 * dim * i);
    free(scratch);
    return 0;
}
