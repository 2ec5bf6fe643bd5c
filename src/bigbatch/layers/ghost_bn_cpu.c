/* Fused CPU kernels for ghost batch normalization (bigbatch.layers.ghost_bn).
 *
 * Built on first use by bigbatch/layers/_cpu_kernel.py with the system C compiler and loaded with
 * ctypes; plain C, no Python or torch headers. Every ghost batch and channel block is one work unit:
 * its few passes (mean, variance, output; or gradient sums, input gradient) run back to back over
 * data that is still in the core's cache, so the input is read from memory about once per direction,
 * where whole-tensor ops read it once per op.
 *
 * Layout: x is contiguous (N, C, S) ("channels first") or (N, S, C) ("channels last"), S the
 * product of the spatial sizes (1 for (N, C) input). Ghost batch j holds samples [j*g, min((j+1)*g,
 * N)), so the last one may be shorter. Statistics are (G, C) arrays, G = ceil(N / g). Sums are
 * accumulated in double. The Python side checks every shape, dtype and contiguity before calling.
 *
 * Threads: OpenMP, linked to the libgomp that torch has already loaded (same soname), so the kernels
 * share torch's thread pool. Only GOMP_parallel and omp_get_thread_num are used (work is handed out
 * with an atomic counter), which every libgomp since GCC 4.9 provides.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define CHANNEL_BLOCK 512 /* most channels per work unit */
#ifndef UNIT_BYTES
#define UNIT_BYTES (512 * 1024) /* aim for a unit's share of one tensor to stay in L2 */
#endif

typedef struct {
    int64_t n, c, s, g, groups, width, blocks, units;
    int channels_last;
} layout_t;

/* Work units are (ghost batch, block of channels). Channels-last: up to CHANNEL_BLOCK channels, a
 * row segment read sequentially. Channels-first: as many channels (runs of s values each, adjacent
 * in memory) as keep the unit near UNIT_BYTES, so the passes after the first read the cache. Blocks
 * are narrowed until there are several units per thread, to balance the load. */
static layout_t make_layout(int64_t n, int64_t c, int64_t s, int64_t g, int channels_last,
                            int nthreads, int64_t elem_size) {
    layout_t l;
    l.n = n;
    l.c = c;
    l.s = s;
    l.g = g;
    l.channels_last = channels_last;
    l.groups = (n + g - 1) / g;
    int64_t width = c < CHANNEL_BLOCK ? c : CHANNEL_BLOCK, floor = channels_last ? 16 : 1;
    if (!channels_last) {
        int64_t per_channel = (g < n ? g : n) * s * elem_size;
        int64_t fit = UNIT_BYTES / (per_channel > 0 ? per_channel : 1);
        if (fit < width) width = fit > 1 ? fit : 1;
    }
    while (width > floor && l.groups * ((c + width - 1) / width) < 4 * (int64_t)nthreads)
        width = (width + 1) / 2;
    l.width = width;
    l.blocks = (c + width - 1) / width;
    l.units = l.groups * l.blocks;
    return l;
}

/* The unit's ghost batch (index, first sample, number of samples) and channels [c0, c1). */
static inline void unit_range(const layout_t *l, int64_t unit, int64_t *j, int64_t *first,
                              int64_t *count, int64_t *c0, int64_t *c1) {
    *j = unit / l->blocks;
    *first = *j * l->g;
    *count = (l->n - *first) < l->g ? (l->n - *first) : l->g;
    *c0 = (unit % l->blocks) * l->width;
    *c1 = (*c0 + l->width) < l->c ? (*c0 + l->width) : l->c;
}

#define RUN_UNITS(layout, nthreads, ...)                                                      \
    do {                                                                                     \
        int64_t next_unit = 0, total_units = (layout).units;                                 \
        int team = (nthreads > 1 && total_units > 1) ? nthreads : 1;                         \
        _Pragma("omp parallel num_threads(team) if (team > 1)")                              \
        {                                                                                    \
            for (;;) {                                                                       \
                int64_t unit = __atomic_fetch_add(&next_unit, 1, __ATOMIC_RELAXED);         \
                if (unit >= total_units) break;                                              \
                __VA_ARGS__                                                                  \
            }                                                                                \
        }                                                                                    \
    } while (0)

#define INLINE static inline __attribute__((always_inline))

/* Per-type code: T is the storage type (float or double); sums are in double. Statistics come from
 * one pass of shifted sums (shift = the first value of the ghost batch and channel, so no
 * cancellation when |mean| >> std), the output from a second pass over cached data. That pass
 * computes (x - hi) * scale + shift', hi = the mean rounded to T and shift' absorbing the rounding
 * (b - (mean - hi) * scale, in double): x - hi is exact when x is near the mean, so no digits of
 * |x| are lost when |mean| >> std (nn.BatchNorm's x * scale + (b - mean * scale) loses a few ulps
 * of |x| there). The input gradient uses the same split. */

#define DEFINE_KERNELS(T, SUFFIX)                                                                  \
                                                                                                   \
    /* Per channel of a unit, from its shifted sums: the output's scale sc, shift sh and rounded   \
     * mean mh, and the statistics written out (see gbn_forward). Shared by both layouts. */       \
    INLINE void forward_coefficients_##SUFFIX(int64_t nb, const double *sum, const double *sq,     \
                                              const double *shift, double m_count, const T *w,     \
                                              const T *b, double eps, T *sc, T *sh, T *mh,         \
                                              T *stats, int64_t gc) {                              \
        for (int64_t h = 0; h < nb; h++) {                                                         \
            double dm = sum[h] / m_count, var = sq[h] / m_count - dm * dm;                         \
            double mu = shift[h] + dm;                                                             \
            if (var < 0.0) var = 0.0;                                                              \
            double inv = 1.0 / sqrt(var + eps), scale = w ? inv * (double)w[h] : inv;              \
            sc[h] = (T)scale;                                                                      \
            mh[h] = (T)mu;                                                                         \
            sh[h] = (T)((b ? (double)b[h] : 0.0) - (mu - (double)mh[h]) * scale);                  \
            stats[h] = (T)mu;                                                                      \
            stats[gc + h] = (T)var;                                                                \
            stats[2 * gc + h] = (T)inv;                                                            \
            stats[3 * gc + h] = (T)(mu - (double)mh[h]);                                           \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* Per channel of a unit, from sum(dy) and sum(dy (x - mean)): the input gradient's            \
     * coefficients ta, tb, td and rounded mean mh (see gbn_backward), and the sums written out. */ \
    INLINE void backward_coefficients_##SUFFIX(int64_t nb, const double *sdy, const double *sdyx,  \
                                               double m_count, const T *w, const T *mean,          \
                                               const T *mean_lo, const T *invstd, T *ta, T *tb,    \
                                               T *td, T *mh, T *sums, int64_t gc) {                \
        for (int64_t h = 0; h < nb; h++) {                                                         \
            double inv = (double)invstd[h], a = w ? (double)w[h] * inv : inv;                      \
            double bq = -a * inv * inv * sdyx[h] / m_count;                                        \
            ta[h] = (T)a;                                                                          \
            tb[h] = (T)bq;                                                                         \
            mh[h] = mean[h];                                                                       \
            td[h] = (T)(-a * sdy[h] / m_count - bq * (double)mean_lo[h]);                          \
            sums[h] = (T)sdy[h];                                                                   \
            sums[gc + h] = (T)sdyx[h];                                                             \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* Channels first: x points at (first sample, first channel); nb channels of s values. */      \
    INLINE void cf_forward_##SUFFIX(const T *x, T *y, int64_t count, int64_t c, int64_t s,          \
                                    int64_t nb, const T *w, const T *b, double eps, T *stats,      \
                                    int64_t gc) {                                                  \
        double sum[CHANNEL_BLOCK], sq[CHANNEL_BLOCK], shift[CHANNEL_BLOCK];                        \
        T sc[CHANNEL_BLOCK], sh[CHANNEL_BLOCK], mh[CHANNEL_BLOCK];                                 \
        double m_count = (double)(count * s);                                                      \
        for (int64_t h = 0; h < nb; h++) {                                                         \
            shift[h] = (double)x[h * s];                                                           \
            sum[h] = sq[h] = 0.0;                                                                  \
        }                                                                                          \
        for (int64_t i = 0; i < count; i++)                                                        \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                const T *p = x + (i * c + h) * s;                                                  \
                double k0 = shift[h], a = 0.0, q = 0.0;                                            \
                for (int64_t k = 0; k < s; k++) {                                                  \
                    double d = (double)p[k] - k0;                                                  \
                    a += d;                                                                        \
                    q += d * d;                                                                    \
                }                                                                                  \
                sum[h] += a;                                                                       \
                sq[h] += q;                                                                        \
            }                                                                                      \
        forward_coefficients_##SUFFIX(nb, sum, sq, shift, m_count, w, b, eps, sc, sh, mh, stats,   \
                                      gc);                                                         \
        for (int64_t i = 0; i < count; i++)                                                        \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                const T *p = x + (i * c + h) * s;                                                  \
                T *q = y + (i * c + h) * s, a = sc[h], o = sh[h], hi = mh[h];                      \
                for (int64_t k = 0; k < s; k++) q[k] = (p[k] - hi) * a + o;                        \
            }                                                                                      \
    }                                                                                              \
                                                                                                   \
    /* Channels last: x points at (first row, first channel); rows of c values, nb used. */       \
    INLINE void cl_forward_##SUFFIX(const T *x, T *y, int64_t rows, int64_t c, int64_t nb,         \
                                    const T *w, const T *b, double eps, T *stats, int64_t gc) {   \
        double sum[CHANNEL_BLOCK], sq[CHANNEL_BLOCK], shift[CHANNEL_BLOCK];                        \
        T sc[CHANNEL_BLOCK], sh[CHANNEL_BLOCK], mh[CHANNEL_BLOCK];                                 \
        double m_count = (double)rows;                                                             \
        for (int64_t h = 0; h < nb; h++) {                                                         \
            shift[h] = (double)x[h];                                                               \
            sum[h] = sq[h] = 0.0;                                                                  \
        }                                                                                          \
        for (int64_t r = 0; r < rows; r++)                                                         \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                double d = (double)x[r * c + h] - shift[h];                                        \
                sum[h] += d;                                                                       \
                sq[h] += d * d;                                                                    \
            }                                                                                      \
        forward_coefficients_##SUFFIX(nb, sum, sq, shift, m_count, w, b, eps, sc, sh, mh, stats,   \
                                      gc);                                                         \
        for (int64_t r = 0; r < rows; r++)                                                         \
            for (int64_t h = 0; h < nb; h++)                                                       \
                y[r * c + h] = (x[r * c + h] - mh[h]) * sc[h] + sh[h];                             \
    }                                                                                              \
                                                                                                   \
    /* stats: 4 (G, C) arrays back to back: mean (rounded to T), biased var, invstd, and the mean's \
     * rounding error (mean - (double)(T)mean, for the backward); gc = G * C. */                   \
    void gbn_forward_##SUFFIX(const T *x, T *y, const T *w, const T *b, T *stats, int64_t n,       \
                              int64_t c, int64_t s, int64_t g, int channels_last, double eps,      \
                              int nthreads) {                                                      \
        layout_t l = make_layout(n, c, s, g, channels_last, nthreads, sizeof(T));                  \
        int64_t gc = l.groups * c;                                                                 \
        RUN_UNITS(l, nthreads, {                                                                   \
            int64_t j, first, count, c0, c1;                                                       \
            unit_range(&l, unit, &j, &first, &count, &c0, &c1);                                    \
            const T *wb = w ? w + c0 : 0, *bb = b ? b + c0 : 0;                                    \
            if (!l.channels_last) {                                                                \
                int64_t off = (first * c + c0) * s;                                                \
                cf_forward_##SUFFIX(x + off, y + off, count, c, s, c1 - c0, wb, bb, eps,           \
                                    stats + j * c + c0, gc);                                       \
            } else {                                                                               \
                int64_t off = first * s * c + c0;                                                  \
                cl_forward_##SUFFIX(x + off, y + off, count * s, c, c1 - c0, wb, bb, eps,          \
                                    stats + j * c + c0, gc);                                       \
            }                                                                                      \
        });                                                                                        \
    }                                                                                              \
                                                                                                   \
    INLINE void cf_backward_##SUFFIX(const T *x, const T *dy, T *dx, int64_t count, int64_t c,     \
                                     int64_t s, int64_t nb, const T *w, const T *mean,             \
                                     const T *mean_lo, const T *invstd, T *sums, int64_t gc) {     \
        double sdy[CHANNEL_BLOCK], sdyx[CHANNEL_BLOCK], m_count = (double)(count * s);             \
        T ta[CHANNEL_BLOCK], tb[CHANNEL_BLOCK], td[CHANNEL_BLOCK], mh[CHANNEL_BLOCK];              \
        for (int64_t h = 0; h < nb; h++) sdy[h] = sdyx[h] = 0.0;                                   \
        for (int64_t i = 0; i < count; i++)                                                        \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                int64_t off = (i * c + h) * s;                                                     \
                double mu = (double)mean[h] + (double)mean_lo[h], a = 0.0, q = 0.0;               \
                for (int64_t k = 0; k < s; k++) {                                                  \
                    double d = (double)dy[off + k];                                                \
                    a += d;                                                                        \
                    q += d * ((double)x[off + k] - mu);                                            \
                }                                                                                  \
                sdy[h] += a;                                                                       \
                sdyx[h] += q;                                                                      \
            }                                                                                      \
        backward_coefficients_##SUFFIX(nb, sdy, sdyx, m_count, w, mean, mean_lo, invstd, ta, tb,   \
                                       td, mh, sums, gc);                                          \
        if (!dx) return;                                                                           \
        for (int64_t i = 0; i < count; i++)                                                        \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                int64_t off = (i * c + h) * s;                                                     \
                T a = ta[h], bq = tb[h], d0 = td[h], hi = mh[h];                                   \
                for (int64_t k = 0; k < s; k++)                                                    \
                    dx[off + k] = a * dy[off + k] + bq * (x[off + k] - hi) + d0;                   \
            }                                                                                      \
    }                                                                                              \
                                                                                                   \
    INLINE void cl_backward_##SUFFIX(const T *x, const T *dy, T *dx, int64_t rows, int64_t c,      \
                                     int64_t nb, const T *w, const T *mean, const T *mean_lo,      \
                                     const T *invstd, T *sums, int64_t gc) {                       \
        double sdy[CHANNEL_BLOCK], sdyx[CHANNEL_BLOCK], mu[CHANNEL_BLOCK], m_count = (double)rows; \
        T ta[CHANNEL_BLOCK], tb[CHANNEL_BLOCK], td[CHANNEL_BLOCK], mh[CHANNEL_BLOCK];              \
        for (int64_t h = 0; h < nb; h++) {                                                         \
            sdy[h] = sdyx[h] = 0.0;                                                                \
            mu[h] = (double)mean[h] + (double)mean_lo[h];                                          \
        }                                                                                          \
        for (int64_t r = 0; r < rows; r++)                                                         \
            for (int64_t h = 0; h < nb; h++) {                                                     \
                double d = (double)dy[r * c + h];                                                  \
                sdy[h] += d;                                                                       \
                sdyx[h] += d * ((double)x[r * c + h] - mu[h]);                                     \
            }                                                                                      \
        backward_coefficients_##SUFFIX(nb, sdy, sdyx, m_count, w, mean, mean_lo, invstd, ta, tb,   \
                                       td, mh, sums, gc);                                          \
        if (!dx) return;                                                                           \
        for (int64_t r = 0; r < rows; r++)                                                         \
            for (int64_t h = 0; h < nb; h++)                                                       \
                dx[r * c + h] = ta[h] * dy[r * c + h] + tb[h] * (x[r * c + h] - mh[h]) + td[h];    \
    }                                                                                              \
                                                                                                   \
    /* stats: the forward's 4 (G, C) arrays; sums: workspace for 2 (G, C) arrays, sum(dy) and      \
     * sum(dy * (x - mean)); grad_w, grad_b: (C,) outputs, or NULL when not needed. If dx is not   \
     * NULL it gets the input gradient dx = A dy + B (x - mean) + D, A = w invstd,                 \
     * B = -A invstd^2 sum(dy (x - mean)) / M, D = -A sum(dy) / M (M values per ghost batch and    \
     * channel). */                                                                                \
    void gbn_backward_##SUFFIX(const T *x, const T *dy, T *dx, const T *w, const T *stats,         \
                               T *sums, T *grad_w, T *grad_b, int64_t n, int64_t c, int64_t s,     \
                               int64_t g, int channels_last, int nthreads) {                       \
        layout_t l = make_layout(n, c, s, g, channels_last, nthreads, sizeof(T));                  \
        int64_t gc = l.groups * c;                                                                 \
        const T *mean = stats, *invstd = stats + 2 * gc, *mean_lo = stats + 3 * gc;                \
        RUN_UNITS(l, nthreads, {                                                                   \
            int64_t j, first, count, c0, c1;                                                       \
            unit_range(&l, unit, &j, &first, &count, &c0, &c1);                                    \
            int64_t at = j * c + c0;                                                               \
            const T *wb = w ? w + c0 : 0;                                                          \
            if (!l.channels_last) {                                                                \
                int64_t off = (first * c + c0) * s;                                                \
                cf_backward_##SUFFIX(x + off, dy + off, dx ? dx + off : 0, count, c, s, c1 - c0,   \
                                     wb, mean + at, mean_lo + at, invstd + at, sums + at, gc);     \
            } else {                                                                               \
                int64_t off = first * s * c + c0;                                                  \
                cl_backward_##SUFFIX(x + off, dy + off, dx ? dx + off : 0, count * s, c, c1 - c0,  \
                                     wb, mean + at, mean_lo + at, invstd + at, sums + at, gc);     \
            }                                                                                      \
        });                                                                                        \
        /* dL/dw = sum_j invstd_j sum(dy (x - mean_j)), dL/db = sum_j sum(dy): O(G C), serial. */  \
        for (int64_t ch = 0; ch < c; ch++) {                                                       \
            double gw = 0.0, gb = 0.0;                                                             \
            for (int64_t j = 0; j < l.groups; j++) {                                               \
                gb += (double)sums[j * c + ch];                                                    \
                gw += (double)sums[gc + j * c + ch] * (double)invstd[j * c + ch];                  \
            }                                                                                      \
            if (grad_w) grad_w[ch] = (T)gw;                                                        \
            if (grad_b) grad_b[ch] = (T)gb;                                                        \
        }                                                                                          \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* Lets the loader check that it has the library it built. */
int gbn_abi_version(void) { return 4; }
