/* modeldiff: one pass over a dense [rows, d] float32 block of SAE latents.
 *
 * Per column j of the d columns, over n_seg segments of rows (segment s is rows seg_lo[s] to
 * seg_hi[s] - 1, one segment per prompt; the caller orders the segments, and the rows within each,
 * by location, while the segments may lie anywhere in the block: a batch whose prompts are grouped
 * but not in prompt order is read where it is, never copied into order):
 *   seg_sum[s, j] += x[t, j]           (float64; sums per prompt, hence the column sum)
 *   sq[j]         += x[t, j]^2         (float64)
 *   fire[j]       += x[t, j] > 0
 *   mx[j], mrow[j]: the largest positive value and the first row (in that order) holding it (mx
 *                   starts at 0 and mrow at -1, so a column that never exceeds 0 keeps them).
 * Rows are read four at a time so that the accumulators are loaded and stored once per four rows.
 * A NaN can hide a column's maximum: the caller redoes any batch whose sums come out NaN.
 *
 * Built on first use by modeldiff/_native.py with the system C compiler; target_clones builds
 * AVX-512 (x86-64-v4: 35% faster than AVX2 where the CPU has it) and AVX2 versions next to the
 * baseline one and picks among them when the library is loaded. Each column's sums run over the
 * rows in the same order in every version, so all give the same bits.
 */
#include <stdint.h>

#if defined(MD_CLONES)
#define MD_TARGETS __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MD_TARGETS
#endif

static inline __attribute__((always_inline)) void one_row(
    const float *restrict row, int64_t t, int64_t d, double *restrict ps,
    double *restrict sq, int64_t *restrict fire, float *restrict mx, int64_t *restrict mrow) {
    for (int64_t j = 0; j < d; j++) {
        float v = row[j];
        double dv = (double)v;
        ps[j] += dv;
        sq[j] += dv * dv;
        fire[j] += (int64_t)(v > 0.0f);
        int64_t gt = -(int64_t)(v > mx[j]);
        mx[j] = v > mx[j] ? v : mx[j];
        mrow[j] = (t & gt) | (mrow[j] & ~gt);
    }
}

MD_TARGETS
void md_dense_stats(const float *restrict x, int64_t d, const int64_t *restrict seg_lo,
                    const int64_t *restrict seg_hi, int64_t n_seg, double *restrict seg_sum,
                    double *restrict sq, int64_t *restrict fire, float *restrict mx,
                    int64_t *restrict mrow) {
    for (int64_t s = 0; s < n_seg; s++) {
        double *restrict ps = seg_sum + s * d;
        int64_t t = seg_lo[s], end = seg_hi[s];
        for (; t + 4 <= end; t += 4) {
            const float *restrict r0 = x + t * d;
            const float *restrict r1 = r0 + d;
            const float *restrict r2 = r1 + d;
            const float *restrict r3 = r2 + d;
            for (int64_t j = 0; j < d; j++) {
                double d0 = r0[j], d1 = r1[j], d2 = r2[j], d3 = r3[j];
                ps[j] += (d0 + d1) + (d2 + d3);
                sq[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
            for (int64_t j = 0; j < d; j++) {
                float v0 = r0[j], v1 = r1[j], v2 = r2[j], v3 = r3[j];
                fire[j] += (int64_t)((v0 > 0.0f) + (v1 > 0.0f) + (v2 > 0.0f) + (v3 > 0.0f));
                /* the four rows' max and the first of them holding it, then the running max:
                 * strictly greater, so the earliest row keeps a tie */
                float m01 = v1 > v0 ? v1 : v0;
                float m23 = v3 > v2 ? v3 : v2;
                float m = m23 > m01 ? m23 : m01;
                int64_t i = v0 == m ? 0 : (v1 == m ? 1 : (v2 == m ? 2 : 3));
                int64_t gt = -(int64_t)(m > mx[j]);
                mx[j] = m > mx[j] ? m : mx[j];
                mrow[j] = ((t + i) & gt) | (mrow[j] & ~gt);
            }
        }
        for (; t < end; t++) one_row(x + t * d, t, d, ps, sq, fire, mx, mrow);
    }
}
