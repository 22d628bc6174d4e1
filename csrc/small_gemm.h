/* Register-blocked products for the fused attention's per-head matrices (32 x 128 x 32 and
 * the like), where a BLAS call spends more time packing its operands and dispatching than
 * multiplying: every operand here already sits in L1/L2, so it is read in place.
 *
 *   C[i, j] = beta * C[i, j] + sum_p A[i * ars + p * acs] * B[p * ldb + j]
 *
 * for i < m, j < n, p < k. A has any row and column strides (so op(A) may be a transpose);
 * B's rows are contiguous. beta is 0 (C is not read) or 1. Blocks of 4 rows by two vectors
 * of columns keep eight accumulators in registers, so each step of p is 2 loads and 4
 * broadcasts for 8 multiply-adds; a single vector of columns takes 8 rows at a time, so
 * there are still eight independent sums to hide the multiply-add latency. Leftover rows go
 * one at a time, leftover columns one entry at a time. The sum over p runs in order for every entry, so the
 * result does not depend on how the caller splits the work.
 *
 * GCC and Clang vector extensions give the SIMD (AVX2 + FMA in the _avx2 builds, SSE2 pairs
 * in the portable one); other compilers get the plain loop at the end.
 */
#ifndef FASTLORA_SMALL_GEMM_H
#define FASTLORA_SMALL_GEMM_H

#include <stddef.h>
#include <string.h>

/* Columns [j0, n) of the product one entry at a time: the vector loops' last few columns,
 * and the whole product where the compiler has no vector extensions. */
#define FL_COLUMNS(NAME, T)                                                                  \
static void NAME(ptrdiff_t j0, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T* A,           \
                 ptrdiff_t ars, ptrdiff_t acs, const T* B, ptrdiff_t ldb, T beta, T* C,      \
                 ptrdiff_t ldc)                                                              \
{                                                                                            \
    ptrdiff_t i, j, p;                                                                       \
    for (j = j0; j < n; j++) {                                                               \
        for (i = 0; i < m; i++) {                                                            \
            T s = 0;                                                                         \
            for (p = 0; p < k; p++)                                                          \
                s += A[i * ars + p * acs] * B[p * ldb + j];                                  \
            C[i * ldc + j] = beta != 0 ? C[i * ldc + j] + s : s;                             \
        }                                                                                    \
    }                                                                                        \
}

FL_COLUMNS(fl_columns_f, float)
FL_COLUMNS(fl_columns_d, double)

#if defined(__GNUC__) || defined(__clang__)

typedef float fl_vf __attribute__((vector_size(32)));  /* 8 floats */
typedef double fl_vd __attribute__((vector_size(32))); /* 4 doubles */

/* memcpy is how unaligned vector loads and stores are spelled portably; it compiles to one
 * unaligned move */
#define FL_LOAD(V, p) ({ V v_; memcpy(&v_, (p), sizeof v_); v_; })
#define FL_STORE(p, v) do { __typeof__(v) s_ = (v); memcpy((p), &s_, sizeof s_); } while (0)

#define FL_SMALL_GEMM(NAME, TAIL, T, V, L)                                                    \
static void NAME(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T* A, ptrdiff_t ars,          \
                 ptrdiff_t acs, const T* B, ptrdiff_t ldb, T beta, T* C, ptrdiff_t ldc)     \
{                                                                                            \
    ptrdiff_t i, j, p;                                                                       \
    const V zero = {0};                                                                      \
    for (j = 0; j + 2 * L <= n; j += 2 * L) {                                                \
        for (i = 0; i + 4 <= m; i += 4) {                                                    \
            V c00 = zero, c01 = zero, c10 = zero, c11 = zero;                                \
            V c20 = zero, c21 = zero, c30 = zero, c31 = zero;                                \
            const T* a = A + i * ars;                                                        \
            const T* b = B + j;                                                              \
            for (p = 0; p < k; p++, a += acs, b += ldb) {                                    \
                V b0 = FL_LOAD(V, b), b1 = FL_LOAD(V, b + L);                                \
                T a0 = a[0], a1 = a[ars], a2 = a[2 * ars], a3 = a[3 * ars];                  \
                c00 += a0 * b0; c01 += a0 * b1;                                              \
                c10 += a1 * b0; c11 += a1 * b1;                                              \
                c20 += a2 * b0; c21 += a2 * b1;                                              \
                c30 += a3 * b0; c31 += a3 * b1;                                              \
            }                                                                                \
            T* c = C + i * ldc + j;                                                          \
            if (beta != 0) {                                                                 \
                c00 += FL_LOAD(V, c); c01 += FL_LOAD(V, c + L); c += ldc;                    \
                c10 += FL_LOAD(V, c); c11 += FL_LOAD(V, c + L); c += ldc;                    \
                c20 += FL_LOAD(V, c); c21 += FL_LOAD(V, c + L); c += ldc;                    \
                c30 += FL_LOAD(V, c); c31 += FL_LOAD(V, c + L);                              \
                c = C + i * ldc + j;                                                         \
            }                                                                                \
            FL_STORE(c, c00); FL_STORE(c + L, c01); c += ldc;                                \
            FL_STORE(c, c10); FL_STORE(c + L, c11); c += ldc;                                \
            FL_STORE(c, c20); FL_STORE(c + L, c21); c += ldc;                                \
            FL_STORE(c, c30); FL_STORE(c + L, c31);                                          \
        }                                                                                    \
        for (; i < m; i++) {                                                                 \
            V c0 = zero, c1 = zero;                                                          \
            const T* a = A + i * ars;                                                        \
            const T* b = B + j;                                                              \
            for (p = 0; p < k; p++, a += acs, b += ldb) {                                    \
                c0 += a[0] * FL_LOAD(V, b);                                                  \
                c1 += a[0] * FL_LOAD(V, b + L);                                              \
            }                                                                                \
            T* c = C + i * ldc + j;                                                          \
            if (beta != 0) { c0 += FL_LOAD(V, c); c1 += FL_LOAD(V, c + L); }                 \
            FL_STORE(c, c0); FL_STORE(c + L, c1);                                            \
        }                                                                                    \
    }                                                                                        \
    for (; j + L <= n; j += L) {                                                             \
        /* one vector of columns (a LoRA rank of 8): eight rows, for eight independent sums */ \
        for (i = 0; i + 8 <= m; i += 8) {                                                    \
            V c0 = zero, c1 = zero, c2 = zero, c3 = zero;                                    \
            V c4 = zero, c5 = zero, c6 = zero, c7 = zero;                                    \
            const T* a = A + i * ars;                                                        \
            const T* b = B + j;                                                              \
            for (p = 0; p < k; p++, a += acs, b += ldb) {                                    \
                V b0 = FL_LOAD(V, b);                                                        \
                c0 += a[0] * b0; c1 += a[ars] * b0;                                          \
                c2 += a[2 * ars] * b0; c3 += a[3 * ars] * b0;                                \
                c4 += a[4 * ars] * b0; c5 += a[5 * ars] * b0;                                \
                c6 += a[6 * ars] * b0; c7 += a[7 * ars] * b0;                                \
            }                                                                                \
            T* c = C + i * ldc + j;                                                          \
            if (beta != 0) {                                                                 \
                c0 += FL_LOAD(V, c); c1 += FL_LOAD(V, c + ldc);                              \
                c2 += FL_LOAD(V, c + 2 * ldc); c3 += FL_LOAD(V, c + 3 * ldc);                \
                c4 += FL_LOAD(V, c + 4 * ldc); c5 += FL_LOAD(V, c + 5 * ldc);                \
                c6 += FL_LOAD(V, c + 6 * ldc); c7 += FL_LOAD(V, c + 7 * ldc);                \
            }                                                                                \
            FL_STORE(c, c0); FL_STORE(c + ldc, c1);                                          \
            FL_STORE(c + 2 * ldc, c2); FL_STORE(c + 3 * ldc, c3);                            \
            FL_STORE(c + 4 * ldc, c4); FL_STORE(c + 5 * ldc, c5);                            \
            FL_STORE(c + 6 * ldc, c6); FL_STORE(c + 7 * ldc, c7);                            \
        }                                                                                    \
        for (; i < m; i++) {                                                                 \
            V c0 = zero;                                                                     \
            const T* a = A + i * ars;                                                        \
            const T* b = B + j;                                                              \
            for (p = 0; p < k; p++, a += acs, b += ldb)                                      \
                c0 += a[0] * FL_LOAD(V, b);                                                  \
            T* c = C + i * ldc + j;                                                          \
            if (beta != 0) c0 += FL_LOAD(V, c);                                              \
            FL_STORE(c, c0);                                                                 \
        }                                                                                    \
    }                                                                                        \
    TAIL(j, m, n, k, A, ars, acs, B, ldb, beta, C, ldc);                                     \
}

FL_SMALL_GEMM(fl_small_gemm_f, fl_columns_f, float, fl_vf, 8)
FL_SMALL_GEMM(fl_small_gemm_d, fl_columns_d, double, fl_vd, 4)

#else  /* no vector extensions: the same sums, one entry at a time */

static void fl_small_gemm_f(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* A, ptrdiff_t ars,
                            ptrdiff_t acs, const float* B, ptrdiff_t ldb, float beta, float* C,
                            ptrdiff_t ldc)
{
    fl_columns_f(0, m, n, k, A, ars, acs, B, ldb, beta, C, ldc);
}

static void fl_small_gemm_d(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const double* A, ptrdiff_t ars,
                            ptrdiff_t acs, const double* B, ptrdiff_t ldb, double beta, double* C,
                            ptrdiff_t ldc)
{
    fl_columns_d(0, m, n, k, A, ars, acs, B, ldb, beta, C, ldc);
}

#endif

#endif  /* FASTLORA_SMALL_GEMM_H */
