/* Fused C-AdamW on CPU, float32, two passes or one for factor_lag=1
 * (dist_cautious.kernels.cpu_fused).
 *
 * Pass 1 (dc_count): per element, m <- lerp(m, g, w); counts[t] += (m * g > 0). The lerp
 *   is torch's: one fused multiply-add, fma(w, g - m, m) for w < 0.5, else
 *   fma(w - 1, g - m, g) (as ATen's vectorized lerp), so m matches torch.lerp bitwise.
 *   Reads g, m; writes m (12 bytes per element).
 * Pass 2 (dc_update): v <- b2 v + (1 - b2) g^2; p <- p * decay (cautious: only where
 *   m p >= 0); p <- p + (s_t * mask * m) / (sqrt(v) / bc2 + eps), with
 *   s_t = -lr / bc1 * alpha_t folded per tensor. Reads p, g, m, v; writes p, v (24 bytes).
 *
 * One pass (dc_onepass, for factor_lag=1: the factors are known before the step): both
 *   in one sweep, counting the mask for the next step; reads p, g, m, v, writes p, m, v
 *   (28 bytes per element).
 *
 * Each call takes a list of tensors (pointer arrays), cut into chunks of CHUNK elements
 * that OpenMP threads share; counts are exact int64, summed per tensor after the loop.
 * Built with -ffp-contract=off and without -ffast-math: every element sees the same
 * IEEE-754 operations in the same order whatever its position (vector body or tail), so
 * results do not depend on how a tensor is split. The element formulas are those of the
 * foreach backend (kernels/foreach.py) in its order, as ATen's CPU kernels compute them:
 * addcmul is fma((1 - b2) g, g, v b2), addcdiv is p + (s u) / den, p * (1 - lr wd),
 * sqrt(v) / sqrt(bc2) + eps, the factor folded into the step scalar; scalars arrive
 * rounded to float32 from the same double expressions. So m, the counts and v equal the
 * foreach backend's bitwise; p can differ in the last bits through sqrt alone: sqrtf here
 * is IEEE-754 correctly rounded, torch's float32 CPU sqrt is not (up to 0.75 ulp; about
 * 20% of random inputs differ from the correctly rounded root by 1 ulp, measured).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CHUNK 32768

typedef struct {
    int64_t tensor;
    int64_t start;
    int64_t len;
} chunk_t;

static chunk_t *make_chunks(int64_t n, const int64_t *lens, int64_t *n_chunks) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += (lens[t] + CHUNK - 1) / CHUNK;
    chunk_t *cs = (chunk_t *)malloc(sizeof(chunk_t) * (size_t)(total > 0 ? total : 1));
    int64_t k = 0;
    for (int64_t t = 0; t < n; t++) {
        for (int64_t s = 0; s < lens[t]; s += CHUNK) {
            cs[k].tensor = t;
            cs[k].start = s;
            cs[k].len = lens[t] - s < CHUNK ? lens[t] - s : CHUNK;
            k++;
        }
    }
    *n_chunks = total;
    return cs;
}

/* The chunks of a counting call and one partial count per chunk (NULL when out of memory). */
static chunk_t *counted_chunks(int64_t n, const int64_t *lens, int64_t *nc, int64_t **part) {
    chunk_t *cs = make_chunks(n, lens, nc);
    *part = (int64_t *)malloc(sizeof(int64_t) * (size_t)(*nc > 0 ? *nc : 1));
    if (!cs || !*part) {
        free(cs);
        free(*part);
        return NULL;
    }
    return cs;
}

/* counts[t]: the sum of its chunks' partial counts (exact int64); frees both arrays. */
static void sum_counts(int64_t n, chunk_t *cs, int64_t nc, int64_t *part, int64_t *counts) {
    for (int64_t t = 0; t < n; t++) counts[t] = 0;
    for (int64_t c = 0; c < nc; c++) counts[cs[c].tensor] += part[c];
    free(cs);
    free(part);
}

/* returns 0, or -1 when out of memory */
int dc_count(int64_t n, float *const *g, float *const *m, const int64_t *lens, float w,
             int lerp_small, int maximize, int threads, int64_t *counts) {
    int64_t nc, *part;
    chunk_t *cs = counted_chunks(n, lens, &nc, &part);
    if (!cs) return -1;
    const float sign = maximize ? -1.0f : 1.0f;
    const float wm1 = w - 1.0f;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < nc; c++) {
        const float *gp = g[cs[c].tensor] + cs[c].start;
        float *mp = m[cs[c].tensor] + cs[c].start;
        const int64_t len = cs[c].len;
        int32_t cnt = 0; /* a chunk has at most CHUNK elements: int32 lanes vectorize */
        if (lerp_small) {
            for (int64_t i = 0; i < len; i++) {
                const float gi = sign * gp[i];
                const float mi = mp[i];
                const float mn = fmaf(w, gi - mi, mi);
                mp[i] = mn;
                cnt += (mn * gi > 0.0f);
            }
        } else {
            for (int64_t i = 0; i < len; i++) {
                const float gi = sign * gp[i];
                const float mi = mp[i];
                const float mn = fmaf(wm1, gi - mi, gi);
                mp[i] = mn;
                cnt += (mn * gi > 0.0f);
            }
        }
        part[c] = cnt;
    }
    sum_counts(n, cs, nc, part, counts);
    return 0;
}

int dc_update(int64_t n, float *const *p, float *const *g, float *const *m, float *const *v,
              const int64_t *lens, const float *scal, float beta2, float b2c, float decay,
              int cautious_wd,
              float bc2_sqrt, float eps, int maximize, int threads) {
    int64_t nc;
    chunk_t *cs = make_chunks(n, lens, &nc);
    if (!cs) return -1;
    const float sign = maximize ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < nc; c++) {
        const int64_t t = cs[c].tensor, off = cs[c].start, len = cs[c].len;
        float *pp = p[t] + off;
        const float *gp = g[t] + off;
        const float *mp = m[t] + off;
        float *vp = v[t] + off;
        const float s = scal[t];
        if (cautious_wd) {
            for (int64_t i = 0; i < len; i++) {
                const float gi = sign * gp[i];
                const float mi = mp[i];
                const float vn = fmaf(b2c * gi, gi, vp[i] * beta2);
                vp[i] = vn;
                const float pi0 = pp[i];
                const float pi = (mi * pi0 >= 0.0f) ? pi0 * decay : pi0;
                const float den = sqrtf(vn) / bc2_sqrt + eps;
                const float u = (float)(mi * gi > 0.0f) * mi;
                pp[i] = pi + (s * u) / den;
            }
        } else {
            for (int64_t i = 0; i < len; i++) {
                const float gi = sign * gp[i];
                const float mi = mp[i];
                const float vn = fmaf(b2c * gi, gi, vp[i] * beta2);
                vp[i] = vn;
                const float pi = pp[i] * decay;
                const float den = sqrtf(vn) / bc2_sqrt + eps;
                const float u = (float)(mi * gi > 0.0f) * mi;
                pp[i] = pi + (s * u) / den;
            }
        }
    }
    free(cs);
    return 0;
}

/* One pass (factor_lag=1, dc_onepass): dc_count then dc_update in one sweep, for a step
 * whose per-tensor factors are known before it (the previous step's): per element
 * m <- lerp(m, g, w), v <- b2 v + (1 - b2) g^2, decay, p <- p + (s_t * mask * m) / den with
 * the given s_t = -lr / bc1 * alpha_t, and counts[t] += mask for the next step's factor.
 * The same operations in the same order as the two passes: bitwise their results. Reads
 * p, g, m, v, writes p, m, v: 28 bytes per element instead of 12 + 24. */
static inline __attribute__((always_inline)) int32_t onepass_chunk(
    float *pp, const float *gp, float *mp, float *vp, int64_t len, float w, float s,
    float sign, float beta2, float b2c, float decay, float bc2_sqrt, float eps,
    const int lerp_small, const int cautious_wd) {
    int32_t cnt = 0;
    const float wm1 = w - 1.0f;
    for (int64_t i = 0; i < len; i++) {
        const float gi = sign * gp[i];
        const float m0 = mp[i];
        const float mi = lerp_small ? fmaf(w, gi - m0, m0) : fmaf(wm1, gi - m0, gi);
        mp[i] = mi;
        const int keep = mi * gi > 0.0f;
        cnt += keep;
        const float vn = fmaf(b2c * gi, gi, vp[i] * beta2);
        vp[i] = vn;
        const float pi0 = pp[i];
        const float pi = cautious_wd ? ((mi * pi0 >= 0.0f) ? pi0 * decay : pi0) : pi0 * decay;
        const float den = sqrtf(vn) / bc2_sqrt + eps;
        const float u = (float)keep * mi;
        pp[i] = pi + (s * u) / den;
    }
    return cnt;
}

int dc_onepass(int64_t n, float *const *p, float *const *g, float *const *m, float *const *v,
               const int64_t *lens, const float *scal, float w, int lerp_small, float beta2,
               float b2c, float decay, int cautious_wd, float bc2_sqrt, float eps, int maximize,
               int threads, int64_t *counts) {
    int64_t nc, *part;
    chunk_t *cs = counted_chunks(n, lens, &nc, &part);
    if (!cs) return -1;
    const float sign = maximize ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < nc; c++) {
        const int64_t t = cs[c].tensor, off = cs[c].start, len = cs[c].len;
        float *pp = p[t] + off;
        const float *gp = g[t] + off;
        float *mp = m[t] + off;
        float *vp = v[t] + off;
        const float s = scal[t];
        int32_t cnt;
        if (lerp_small && cautious_wd)
            cnt = onepass_chunk(pp, gp, mp, vp, len, w, s, sign, beta2, b2c, decay, bc2_sqrt,
                                eps, 1, 1);
        else if (lerp_small)
            cnt = onepass_chunk(pp, gp, mp, vp, len, w, s, sign, beta2, b2c, decay, bc2_sqrt,
                                eps, 1, 0);
        else if (cautious_wd)
            cnt = onepass_chunk(pp, gp, mp, vp, len, w, s, sign, beta2, b2c, decay, bc2_sqrt,
                                eps, 0, 1);
        else
            cnt = onepass_chunk(pp, gp, mp, vp, len, w, s, sign, beta2, b2c, decay, bc2_sqrt,
                                eps, 0, 0);
        part[c] = cnt;
    }
    sum_counts(n, cs, nc, part, counts);
    return 0;
}
