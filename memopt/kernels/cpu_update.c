/* Fused CPU loops for the optimizer updates whose PyTorch form makes many passes over memory (docs/optimizers.md,
 * "Step time on CPU"). memopt/kernels/cpu.py compiles this file with the system C compiler, loads it with ctypes
 * and checks its arguments; the PyTorch functions in memopt/functional are the specification and the parity
 * oracle. Every operation below is the fp32 operation the PyTorch form performs, in the same order:
 *   - torch's lerp with a scalar weight w:  |w| < 0.5 ? fma(w, b - a, a) : fma(w - 1, b - a, b)
 *   - add with alpha:                        fma(b, alpha, a)
 *   - addcmul:                               fma(s * b, c, a)
 *   - addcdiv:                               a + (s * b) / c
 * The file is built with -ffp-contract=off, so the compiler fuses nothing else.
 *
 * 8-bit state: row blocks (rows x length, each row cut into blocks of bs, the last one possibly shorter), one
 * fp32 maximum per block; the code of x is the number of the map's midpoints strictly below x / maximum (as in
 * memopt/functional/quantize.py: the 65536-entry table `low` on that value's top 16 bits, then `extra`
 * compare-and-step passes on the midpoints padded with +inf). */
#include <float.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *code;   /* 256 code values */
    const int32_t *low;  /* 65536 midpoint counts */
    const float *mids;   /* 255 midpoints + inf */
    int32_t extra;       /* compare-and-step passes */
} qmap;

static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline float lerp_scalar(float a, float b, float w) {
    return fabsf(w) < 0.5f ? fmaf(w, b - a, a) : fmaf(w - 1.0f, b - a, b);
}

static inline uint8_t nearest_code(float v, const qmap *q) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    int32_t idx = q->low[bits >> 16];
    for (int32_t k = 0; k < q->extra; k++) idx += q->mids[idx] < v;
    return (uint8_t)idx;
}

/* Quantize n fp32 values into codes and the block maximum, as quantize_rows does. Returns 0, or 1 when a value is
 * NaN or infinite (nothing written). */
static int quantize_block(const float *x, int64_t n, uint8_t *codes, float *absmax, const qmap *q) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t j = 0; j < n; j++) {
        float a = fabsf(x[j]);
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
    }
    if (bad) return 1;
    if (amax > 0.0f && amax < FLT_MIN) amax = FLT_MIN;
    float recip = 1.0f / (amax > 0.0f ? amax : 1.0f);
    for (int64_t j = 0; j < n; j++) {
        float v = x[j] * recip;
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        codes[j] = nearest_code(v, q);
    }
    *absmax = amax;
    return 0;
}

static inline float normalized(float g, float r, float c, float eps, float clip) {
    float u = g / (r * c + eps);
    return u < -clip ? -clip : (u > clip ? clip : u);
}

/* The sums of squares of the rows (row_ss, rows values) and of the columns (col_ss, cols values) of g (rows x cols),
 * accumulated in double and rounded to fp32 once. Returns 0 when an element is NaN or infinite (a finite fp32
 * element's square cannot overflow a double, so this is the gradient's finite check), 1 otherwise, -1 when out of
 * memory. */
int32_t memopt_square_sums(const float *g, int64_t rows, int64_t cols, float *row_ss, float *col_ss,
                           int32_t threads) {
    double *cols_of = (double *)calloc((size_t)threads * (size_t)cols, sizeof(double));
    if (!cols_of) return -1;
    int finite = 1;
#pragma omp parallel num_threads(threads) reduction(& : finite)
    {
        double *acc = cols_of + (size_t)thread_index() * (size_t)cols;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *gi = g + i * cols;
            double part[8] = {0.0};  /* eight running sums: a vector of them, not one chain of dependent adds */
            int64_t j = 0;
            for (; j + 8 <= cols; j += 8)
                for (int k = 0; k < 8; k++) {
                    const double x = gi[j + k];
                    part[k] += x * x;
                    acc[j + k] += x * x;
                }
            for (; j < cols; j++) {
                const double x = gi[j];
                part[0] += x * x;
                acc[j] += x * x;
            }
            double s = 0.0;
            for (int k = 0; k < 8; k++) s += part[k];
            finite &= s <= DBL_MAX;  /* NaN or Inf in the row */
            row_ss[i] = (float)s;
        }
    }
    for (int64_t j = 0; j < cols; j++) {
        double s = 0.0;
        for (int32_t t = 0; t < threads; t++) s += cols_of[(size_t)t * (size_t)cols + j];
        col_ss[j] = (float)s;
    }
    free(cols_of);
    return finite;
}

/* scale="factored"'s factors from the sums (memopt/functional/sgdsai.py, factored_scales), in place:
 * r_i = sqrt(row_ss_i / cols), c_j = sqrt(C_j / max(mean(C), tiny)) with C_j = col_ss_j / rows. The mean is taken
 * in double (the PyTorch form's in fp32). */
static void scales_from_sums(float *row, float *col, int64_t rows, int64_t cols, float tiny) {
    for (int64_t i = 0; i < rows; i++) row[i] = sqrtf(row[i] / (float)cols);
    double total = 0.0;
    for (int64_t j = 0; j < cols; j++) {
        col[j] = col[j] / (float)rows;
        total += col[j];
    }
    float ms = (float)(total / (double)cols);
    ms = ms < tiny ? tiny : ms;
    for (int64_t j = 0; j < cols; j++) col[j] = sqrtf(col[j] / ms);
}

/* scale="factored" SGD-SaI on rows x cols: u = clamp(g / (r_i c_j + eps), -clip, clip); m = lerp(m, u, w);
 * p = fma(m, alpha, p * decay) (decay 1: no multiply). With codes == NULL the momentum is the fp32 tensor m, else
 * 8-bit row blocks (codes, absmax). The factors r, c are given, or (NULL) computed from g's sums of squares, which
 * also check g: when it holds NaN or Inf and check_finite is set, nothing is written and -2 is returned.
 * Otherwise returns the number of blocks left unwritten because their new momentum is not finite, or -1 when out
 * of memory (nothing written). */
int64_t memopt_factored_sgdsai(float *p, const float *g, float *m, uint8_t *codes, float *absmax, int64_t rows,
                               int64_t cols, const float *r, const float *c, int32_t check_finite, float tiny,
                               float eps, float clip, float w, float decay, float alpha, int64_t bs,
                               const float *code, const int32_t *low, const float *mids, int32_t extra,
                               int32_t threads) {
    const qmap q = {code, low, mids, extra};
    const int64_t per_row = codes ? (cols + bs - 1) / bs : 1;
    int64_t bad = 0;
    float *factors = NULL;
    if (!r) {
        factors = (float *)malloc((size_t)(rows + cols) * sizeof(float));
        if (!factors) return -1;
        const int32_t finite = memopt_square_sums(g, rows, cols, factors, factors + rows, threads);
        if (finite < 0 || (!finite && check_finite)) {
            free(factors);
            return finite < 0 ? -1 : -2;
        }
        scales_from_sums(factors, factors + rows, rows, cols, tiny);
        r = factors;
        c = factors + rows;
    }
    float *bufs = codes ? (float *)malloc((size_t)threads * (size_t)bs * sizeof(float)) : NULL;
    if (codes && !bufs) {
        free(factors);
        return -1;
    }
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *buf = codes ? bufs + (size_t)thread_index() * (size_t)bs : NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            float *pi = p + i * cols;
            const float *gi = g + i * cols;
            const float ri = r[i];
            if (!codes) {
                float *mi = m + i * cols;
                for (int64_t j = 0; j < cols; j++) {
                    float mj = lerp_scalar(mi[j], normalized(gi[j], ri, c[j], eps, clip), w);
                    mi[j] = mj;
                    pi[j] = fmaf(mj, alpha, decay != 1.0f ? pi[j] * decay : pi[j]);
                }
                continue;
            }
            for (int64_t b = 0; b < per_row; b++) {
                const int64_t j0 = b * bs, n = cols - j0 < bs ? cols - j0 : bs;
                uint8_t *cb = codes + i * cols + j0;
                float *ab = absmax + i * per_row + b;
                const float old = *ab;
                for (int64_t j = 0; j < n; j++)
                    buf[j] = lerp_scalar(code[cb[j]] * old, normalized(gi[j0 + j], ri, c[j0 + j], eps, clip), w);
                if (quantize_block(buf, n, cb, ab, &q)) {
                    bad++;
                    continue;
                }
                for (int64_t j = 0; j < n; j++) {
                    float pj = pi[j0 + j];
                    pi[j0 + j] = fmaf(buf[j], alpha, decay != 1.0f ? pj * decay : pj);
                }
            }
        }
    }
    free(bufs);
    free(factors);
    return bad;
}

/* One AdamW element: m = lerp(m, g', w1); v = fma((1 - beta2) g', g', v beta2) (g' = -g when maximizing); then the
 * parameter p decay + (step_size m) / (sqrt(v) / bc2_sqrt + eps), from the fp32 moments (the state keeps them
 * re-quantized). */
typedef struct {
    float w1, beta2, one_minus_beta2, decay, bc2_sqrt, eps, step_size;
    int32_t maximize;
} adam_args;

static inline void adam_moments(float g, float *m, float *v, const adam_args *a) {
    const float gg = a->maximize ? -g : g;
    *m = lerp_scalar(*m, gg, a->w1);
    *v = fmaf(a->one_minus_beta2 * gg, gg, *v * a->beta2);
}

static inline float adam_param(float p, float m, float v, const adam_args *a) {
    return p * a->decay + (a->step_size * m) / (sqrtf(v) / a->bc2_sqrt + a->eps);
}

/* AdamW with both moments in 8-bit row blocks (m on the signed map qm, v on the unsigned map qv; v_code is the map
 * v is decoded with, memopt/functional/adamw.py's second_moment_read_map, v_low and v_mids the quantizer's). Returns
 * the number of blocks left unwritten (a moment not finite), or -1 when out of memory (nothing written). */
int64_t memopt_adamw_8bit(float *p, const float *g, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                          float *v_absmax, int64_t rows, int64_t cols, int64_t bs, float w1, float beta2,
                          float one_minus_beta2, float decay, float bc2_sqrt, float eps, float step_size,
                          int32_t maximize, const float *m_code, const int32_t *m_low, const float *m_mids,
                          int32_t m_extra, const float *v_code, const int32_t *v_low, const float *v_mids,
                          int32_t v_extra, int32_t threads) {
    const qmap qm = {m_code, m_low, m_mids, m_extra}, qv = {v_code, v_low, v_mids, v_extra};
    const adam_args a = {w1, beta2, one_minus_beta2, decay, bc2_sqrt, eps, step_size, maximize};
    const int64_t per_row = (cols + bs - 1) / bs;
    int64_t bad = 0;
    float *values = (float *)malloc((size_t)threads * 2 * (size_t)bs * sizeof(float));
    uint8_t *new_codes = (uint8_t *)malloc((size_t)threads * 2 * (size_t)bs);
    if (!values || !new_codes) {
        free(values);
        free(new_codes);
        return -1;
    }
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *mb = values + (size_t)thread_index() * 2 * (size_t)bs, *vb = mb + bs;
        uint8_t *mc_new = new_codes + (size_t)thread_index() * 2 * (size_t)bs, *vc_new = mc_new + bs;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < rows * per_row; blk++) {
            const int64_t i = blk / per_row, b = blk % per_row;
            const int64_t j0 = b * bs, n = cols - j0 < bs ? cols - j0 : bs, at = i * cols + j0;
            const float ma = m_absmax[blk], va = v_absmax[blk];
            for (int64_t j = 0; j < n; j++) {
                mb[j] = m_code[m_codes[at + j]] * ma;
                vb[j] = v_code[v_codes[at + j]] * va;
                adam_moments(g[at + j], &mb[j], &vb[j], &a);
            }
            float new_ma, new_va;
            if (quantize_block(mb, n, mc_new, &new_ma, &qm) || quantize_block(vb, n, vc_new, &new_va, &qv)) {
                bad++;
                continue;
            }
            memcpy(m_codes + at, mc_new, (size_t)n);
            memcpy(v_codes + at, vc_new, (size_t)n);
            m_absmax[blk] = new_ma;
            v_absmax[blk] = new_va;
            for (int64_t j = 0; j < n; j++) p[at + j] = adam_param(p[at + j], mb[j], vb[j], &a);
        }
    }
    free(values);
    free(new_codes);
    return bad;
}

/* Lion: c = lerp(m, g', w1); p = fma(sign(c), -lr, p * decay); m = lerp(m, g', w2)  (g' = -g when maximizing).
 * With codes == NULL the momentum is the fp32 tensor m (n = rows x cols elements, any shape), else 8-bit row
 * blocks. Returns the number of blocks left unwritten (a momentum not finite), or -1 when out of memory. */
static inline float lion_element(float *pj, float m, float g, float w1, float w2, float decay, float lr,
                                 int32_t maximize) {
    const float gg = maximize ? -g : g, c = lerp_scalar(m, gg, w1);
    const float sign = (float)((c > 0.0f) - (c < 0.0f));
    *pj = fmaf(sign, -lr, *pj * decay);
    return lerp_scalar(m, gg, w2);
}

int64_t memopt_lion(float *p, const float *g, float *m, uint8_t *codes, float *absmax, int64_t rows, int64_t cols,
                    float w1, float w2, float decay, float lr, int32_t maximize, int64_t bs, const float *code,
                    const int32_t *low, const float *mids, int32_t extra, int32_t threads) {
    if (!codes) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < rows * cols; i++) m[i] = lion_element(&p[i], m[i], g[i], w1, w2, decay, lr, maximize);
        return 0;
    }
    const qmap q = {code, low, mids, extra};
    const int64_t per_row = (cols + bs - 1) / bs;
    float *bufs = (float *)malloc((size_t)threads * 2 * (size_t)bs * sizeof(float));
    if (!bufs) return -1;
    int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *pb = bufs + (size_t)thread_index() * 2 * (size_t)bs, *mb = pb + bs;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < rows * per_row; blk++) {
            const int64_t i = blk / per_row, b = blk % per_row;
            const int64_t j0 = b * bs, n = cols - j0 < bs ? cols - j0 : bs, at = i * cols + j0;
            const float old = absmax[blk];
            for (int64_t j = 0; j < n; j++) {
                pb[j] = p[at + j];
                mb[j] = lion_element(&pb[j], code[codes[at + j]] * old, g[at + j], w1, w2, decay, lr, maximize);
            }
            if (quantize_block(mb, n, codes + at, absmax + blk, &q)) {
                bad++;
                continue;
            }
            memcpy(p + at, pb, (size_t)n * sizeof(float));
        }
    }
    free(bufs);
    return bad;
}

/* AdamSN (memopt/optim/snsm.py: Subset-Norm, full first moment) on rows x cols, one subset per row (by_rows) or per
 * column: s = the subset's sum of squares of g (double, rounded to fp32 once); sn = fma(s, 1 - beta2, sn * beta2);
 * d = sqrt(sn / bc2) + eps; m = lerp(m, g, w1); p = fma((m / bc1) / d, -lr, p). A row's sum is taken just before
 * the row is updated (it is then in the cache); the columns' sums need every row, so they are taken first. Returns
 * 0, or -1 when out of memory (nothing written). */
int32_t memopt_adamsn(float *p, const float *g, float *m, float *sn, int64_t rows, int64_t cols, int32_t by_rows,
                      float w1, float beta2, float one_minus_beta2, float bc1, float bc2, float eps, float lr,
                      int32_t threads) {
    float *sums = NULL, *d = NULL;  /* by columns: the row and column sums, then each column's d */
    if (!by_rows) {
        sums = (float *)malloc((size_t)(rows + cols) * sizeof(float));
        if (!sums) return -1;
        if (memopt_square_sums(g, rows, cols, sums, sums + rows, threads) < 0) {
            free(sums);
            return -1;
        }
        d = sums + rows;
        for (int64_t j = 0; j < cols; j++) {
            sn[j] = fmaf(d[j], one_minus_beta2, sn[j] * beta2);
            d[j] = sqrtf(sn[j] / bc2) + eps;
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *gi = g + i * cols;
        float *pi = p + i * cols, *mi = m + i * cols;
        float di = 0.0f;
        if (by_rows) {
            double part[8] = {0.0};
            int64_t j = 0;
            for (; j + 8 <= cols; j += 8)
                for (int k = 0; k < 8; k++) part[k] += (double)gi[j + k] * gi[j + k];
            for (; j < cols; j++) part[0] += (double)gi[j] * gi[j];
            double s = 0.0;
            for (int k = 0; k < 8; k++) s += part[k];
            sn[i] = fmaf((float)s, one_minus_beta2, sn[i] * beta2);
            di = sqrtf(sn[i] / bc2) + eps;
        }
        for (int64_t j = 0; j < cols; j++) {
            const float mj = lerp_scalar(mi[j], gi[j], w1);
            mi[j] = mj;
            pi[j] = fmaf((mj / bc1) / (by_rows ? di : d[j]), -lr, pi[j]);
        }
    }
    free(sums);
    return 0;
}

/* Sign descent, FRUGAL's state-free update: p = p - lr * sign(g) (sign(0) = 0; a NaN stays NaN, as torch.sign). The
 * product lr * sign(g) is exact, so this equals p.sub_(g.sign(), alpha=lr) bit for bit. */
void memopt_sign_step(float *p, const float *g, int64_t n, float lr, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float s = g[i] > 0.0f ? 1.0f : (g[i] < 0.0f ? -1.0f : g[i]);
        p[i] = p[i] - lr * s;
    }
}
