/* modeldiff: sign-flip hit counts of a paired permutation test, without the [draws, columns]
 * matrix of statistics.
 *
 * For columns j in [c0, c1) of d (an [n, ldd] float32 matrix, one row per prompt) and each of the
 * n_draws rows s of signs (+1 / -1, row stride lds):
 *   y = |sum_p s[p] * d[p, j]|   (float32)
 *   sure[j]  += y >= hi[j]
 *   maybe[j] += y >= lo[j]
 * The caller puts lo and hi on either side of the float64 threshold, farther than float32 rounding
 * can move y in any summation order: a column whose counts differ has a draw too close to call and
 * is recounted in float64 (modeldiff/uncertainty.py). A statistic is never written to memory: it
 * lives in a register from its first product to its comparisons. Each step takes DB draws against
 * NV vectors of columns, so each load of d serves DB draws.
 *
 * The kernel body below is compiled twice, by including this file into itself: 8-wide vectors
 * (AVX2 with FMA in the x86-64-v3 clone, 16 registers) and, on x86-64 with MD_CLONES, 16-wide
 * vectors for AVX-512 CPUs (32 registers: more draws per step). md_sign_hits picks one at run time.
 * Built with the other kernels by modeldiff/_native.py.
 */
#ifndef MD_SIGN_BODY
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(MD_CLONES) && defined(__x86_64__)
#define MD_WIDE 1
#endif

/* an unaligned vector load */
#define MD_LOAD(v, ptr) __builtin_memcpy(&(v), (ptr), sizeof(v))

/* 8-wide: the x86-64-v3 clone beside the baseline one */
#define MD_SIGN_BODY 1
#define MD_NAME md_sign_hits_8
#define MD_W 8
#define MD_NV 4
#define MD_DB 3
#if defined(MD_CLONES)
#define MD_ATTR __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MD_ATTR
#endif
#include "sign_hits.c" /* this file again, as the kernel body */
#undef MD_NAME
#undef MD_W
#undef MD_NV
#undef MD_DB
#undef MD_ATTR

#if defined(MD_WIDE)
/* 16-wide, AVX-512 only */
#define MD_NAME md_sign_hits_16
#define MD_W 16
#define MD_NV 2
#define MD_DB 6
#define MD_ATTR __attribute__((target("arch=x86-64-v4")))
#include "sign_hits.c" /* this file again, as the kernel body */
#endif

void md_sign_hits(const float *restrict signs, int64_t n_draws, int64_t n, int64_t lds,
                  const float *restrict d, int64_t ldd, int64_t c0, int64_t c1,
                  const float *restrict lo, const float *restrict hi, int64_t *restrict sure,
                  int64_t *restrict maybe) {
#if defined(MD_WIDE)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        md_sign_hits_16(signs, n_draws, n, lds, d, ldd, c0, c1, lo, hi, sure, maybe);
        return;
    }
#endif
    md_sign_hits_8(signs, n_draws, n, lds, d, ldd, c0, c1, lo, hi, sure, maybe);
}

/* 1 when md_sign_hits runs vector code on this CPU (the baseline x86 build of its 256-bit vector
 * code is slower than PyTorch's matrix product: the caller then keeps to PyTorch) */
int64_t md_sign_hits_vectorised(void) {
#if defined(MD_CLONES) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(__x86_64__) || defined(__i386__)
    return 0;
#else
    return 1; /* other architectures: the vector code maps to their own registers */
#endif
}

#else /* MD_SIGN_BODY: one kernel, for the vector width MD_W */

#define MD_CAT2(a, b) a##b
#define MD_CAT(a, b) MD_CAT2(a, b)
#define MD_VF MD_CAT(md_vf, MD_W)
#define MD_VI MD_CAT(md_vi, MD_W)
typedef float MD_VF __attribute__((vector_size(4 * MD_W)));
typedef int32_t MD_VI __attribute__((vector_size(4 * MD_W)));
#define MD_JB (MD_W * MD_NV) /* columns per block */

MD_ATTR
static void MD_NAME(const float *restrict signs, int64_t n_draws, int64_t n, int64_t lds,
                    const float *restrict d, int64_t ldd, int64_t c0, int64_t c1,
                    const float *restrict lo, const float *restrict hi, int64_t *restrict sure,
                    int64_t *restrict maybe) {
    const MD_VI absmask = (MD_VI){0} + 0x7fffffff;
    /* each block of columns is copied into a contiguous [n, MD_JB] buffer first: read in place,
     * its rows lie ldd floats apart, a page apart or more for thousands of latents, and every step
     * over the prompts would walk n pages (the copy measured ~12% faster at 895 prompts) */
    float *blk = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * MD_JB);
    int64_t j0 = c0;
    for (; blk != NULL && j0 + MD_JB <= c1; j0 += MD_JB) {
        for (int64_t p = 0; p < n; p++)
            __builtin_memcpy(blk + p * MD_JB, d + p * ldd + j0, sizeof(float) * MD_JB);
        MD_VF h[MD_NV], l[MD_NV];
        MD_VI cs[MD_NV], cm[MD_NV];
        for (int v = 0; v < MD_NV; v++) {
            MD_LOAD(h[v], hi + j0 + MD_W * v);
            MD_LOAD(l[v], lo + j0 + MD_W * v);
            cs[v] = (MD_VI){0};
            cm[v] = (MD_VI){0};
        }
        int64_t b = 0;
        for (; b + MD_DB <= n_draws; b += MD_DB) {
            const float *restrict s = signs + b * lds;
            MD_VF a[MD_DB][MD_NV];
#pragma GCC unroll 32
            for (int r = 0; r < MD_DB; r++)
                for (int v = 0; v < MD_NV; v++) a[r][v] = (MD_VF){0};
            for (int64_t p = 0; p < n; p++) {
                const float *restrict dp = blk + p * MD_JB;
                MD_VF x[MD_NV];
#pragma GCC unroll 8
                for (int v = 0; v < MD_NV; v++) MD_LOAD(x[v], dp + MD_W * v);
#pragma GCC unroll 32
                for (int r = 0; r < MD_DB; r++) {
                    const float sp = s[r * lds + p];
                    for (int v = 0; v < MD_NV; v++) a[r][v] += sp * x[v];
                }
            }
#pragma GCC unroll 32
            for (int r = 0; r < MD_DB; r++)
                for (int v = 0; v < MD_NV; v++) {
                    MD_VF y = (MD_VF)((MD_VI)a[r][v] & absmask);
                    cs[v] -= (MD_VI)(y >= h[v]); /* a true comparison is -1 in every bit */
                    cm[v] -= (MD_VI)(y >= l[v]);
                }
        }
        for (; b < n_draws; b++) {
            const float *restrict s = signs + b * lds;
            MD_VF a[MD_NV];
            for (int v = 0; v < MD_NV; v++) a[v] = (MD_VF){0};
            for (int64_t p = 0; p < n; p++)
                for (int v = 0; v < MD_NV; v++) {
                    MD_VF x;
                    MD_LOAD(x, blk + p * MD_JB + MD_W * v);
                    a[v] += s[p] * x;
                }
            for (int v = 0; v < MD_NV; v++) {
                MD_VF y = (MD_VF)((MD_VI)a[v] & absmask);
                cs[v] -= (MD_VI)(y >= h[v]);
                cm[v] -= (MD_VI)(y >= l[v]);
            }
        }
        for (int v = 0; v < MD_NV; v++)
            for (int i = 0; i < MD_W; i++) {
                sure[j0 + MD_W * v + i] += cs[v][i];
                maybe[j0 + MD_W * v + i] += cm[v][i];
            }
    }
    free(blk);
    /* the remaining columns (all of them if the buffer could not be had), one at a time */
    for (int64_t j = j0; j < c1; j++) {
        int64_t cs = 0, cm = 0;
        for (int64_t b = 0; b < n_draws; b++) {
            const float *restrict s = signs + b * lds;
            float acc = 0.0f;
            for (int64_t p = 0; p < n; p++) acc += s[p] * d[p * ldd + j];
            const float y = fabsf(acc);
            cs += y >= hi[j];
            cm += y >= lo[j];
        }
        sure[j] += cs;
        maybe[j] += cm;
    }
}
#undef MD_JB
#undef MD_VF
#undef MD_VI

#endif /* MD_SIGN_BODY */
