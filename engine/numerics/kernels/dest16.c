/* 16-bit (bf16) dest accumulation of the Wormhole matrix engine, one K block at a time.
 *
 * out[b, m, n] = dest after the block, where dest starts at init[b, m, n] (or 0) and, walking K in
 * 32-wide tiles, for each tile, for each fidelity phase p (outer), for each 16-wide slice s of the
 * tile (inner: one MVMUL), takes
 *     dest <- bf16_rne(dest + sum_{k in slice} x[b, p, m, k] * w[b, p, k, n])
 * (ties away from zero instead after dest16_set_ties_away(1): the assumption band's alternative)
 * with the 16-product partial summed in fp32 in k order. engine/numerics/fidelity.py's `dest16_torch`
 * computes the same thing in the same order, bit for bit. The products of truncated operands
 * (<= 8-bit significands) are exact in fp32, so a fused multiply-add rounds exactly as a multiply
 * then an add: FMA contraction is allowed. K must be a multiple of 32 (zero-padded by the caller).
 *
 * Operands: x holds the activation's per-phase slices [B, P, M, K] (phase p: xh for p < 2, xl
 * after); w is the raw fp32 weight [Bw, K, N], sliced here while packing: phases 0 and 2 read wh
 * (hidden one + top 4 mantissa bits), phases 1 and 3 wl (the next 3 bits), denormals flushed.
 *
 * Work items are (batch, 16-column panel) pairs, numbered b * npanels + panel; one call computes
 * items item0..item1-1, so callers run disjoint ranges on several threads (no OpenMP runtime: it
 * would be a second one beside torch's).
 *
 * Layout: a 6-row x 16-column micro-tile of partials lives in vector registers; the weight's
 * 16-column panel (all phases, all of K) is packed once per panel so the k loop streams it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6
#define NB 16
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

/* 1: bf16 narrowing rounds ties away from zero (an assumption switch); 0: nearest even (default) */
static uint32_t g_ties_away = 0;

void dest16_set_ties_away(int64_t away) { g_ties_away = away ? 1u : 0u; }

static inline v8 rnd_bf16(v8 f) {
    u8v u;
    memcpy(&u, &f, 32);
    u8v special = (u & 0x7F800000u) == 0x7F800000u; /* NaN / inf pass through */
    u8v r = (u + 0x7FFFu + (((u >> 16) & 1u) | g_ties_away)) & 0xFFFF0000u;
    u = (special & u) | (~special & r);
    memcpy(&f, &u, 32);
    return f;
}

static inline float w_slice(float v, int64_t p) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7F800000u) == 0) return 0.0f; /* denormals flush to zero */
    uint32_t hi = u & 0xFFF80000u, all7 = u & 0xFFFF0000u;
    float h, a;
    memcpy(&h, &hi, 4);
    memcpy(&a, &all7, 4);
    return (p & 1) ? a - h : h; /* wl = w7 - wh is exact */
}

static inline v8 splat(float a) { return (v8){a, a, a, a, a, a, a, a}; }

void dest16_block(const float *x, const float *w, const float *init, float *out,
                  int64_t B, int64_t P, int64_t M, int64_t K, int64_t N, int64_t w_batched, int64_t kb,
                  int64_t item0, int64_t item1) {
    const int64_t block_tiles = kb > 0 ? kb / 32 : K / 32;
    const int64_t npanels = (N + NB - 1) / NB;
    const int64_t T = K / 32;
    {
        float *panel = aligned_alloc(32, (size_t)(P * K * NB) * sizeof(float));
        for (int64_t item = item0; item < item1 && item < B * npanels; item++) {
            const int64_t b = item / npanels, jb = item % npanels;
            {
                const int64_t n0 = jb * NB;
                const int64_t nb = (N - n0) < NB ? (N - n0) : NB;
                const float *wb = w + (w_batched ? b : 0) * K * N;
                const float *xb = x + b * P * M * K;
                for (int64_t p = 0; p < P; p++) { /* pack [P][K][NB]: the phase's weight slice */
                    for (int64_t k = 0; k < K; k++) {
                        float *dst = panel + (p * K + k) * NB;
                        memset(dst, 0, NB * sizeof(float));
                        for (int64_t j = 0; j < nb; j++) dst[j] = w_slice(wb[k * N + n0 + j], p);
                    }
                }
                for (int64_t m0 = 0; m0 < M; m0 += MR) {
                    const int64_t mr = (M - m0) < MR ? (M - m0) : MR;
                    v8 dest[MR][2], acc[MR][2];
                    for (int64_t r = 0; r < MR; r++) {
                        float tmp[NB] = {0};
                        if (init && r < mr) memcpy(tmp, init + (b * M + m0 + r) * N + n0, nb * sizeof(float));
                        memcpy(&dest[r][0], tmp, 32);
                        memcpy(&dest[r][1], tmp + 8, 32);
                    }
                    const float *xr[MR];
                    for (int64_t r = 0; r < MR; r++) xr[r] = xb + (m0 + (r < mr ? r : 0)) * K;
                    const int64_t last_start = ((T - 1) / block_tiles) * block_tiles;
                    for (int64_t t = 0; t < T; t++) {
                        if (kb > 0 && t > 0 && t % block_tiles == 0) { /* a block ends: packer L1 acc */
                            for (int64_t r = 0; r < MR; r++)
                                for (int64_t h = 0; h < 2; h++) {
                                    acc[r][h] = t == block_tiles ? dest[r][h] : rnd_bf16(acc[r][h] + dest[r][h]);
                                    dest[r][h] = t == last_start ? acc[r][h] : splat(0);
                                }
                        }
                        for (int64_t p = 0; p < P; p++) {
                            for (int64_t s = 0; s < 2; s++) {
                                const int64_t k0 = t * 32 + s * 16;
                                v8 a00 = splat(0), a01 = splat(0), a10 = splat(0), a11 = splat(0);
                                v8 a20 = splat(0), a21 = splat(0), a30 = splat(0), a31 = splat(0);
                                v8 a40 = splat(0), a41 = splat(0), a50 = splat(0), a51 = splat(0);
                                const float *pp = panel + (p * K + k0) * NB;
                                const int64_t xo = p * M * K + k0;
                                for (int64_t k = 0; k < 16; k++) {
                                    v8 w0, w1;
                                    memcpy(&w0, pp + k * NB, 32);
                                    memcpy(&w1, pp + k * NB + 8, 32);
                                    v8 x0 = splat(xr[0][xo + k]), x1 = splat(xr[1][xo + k]);
                                    v8 x2 = splat(xr[2][xo + k]), x3 = splat(xr[3][xo + k]);
                                    v8 x4 = splat(xr[4][xo + k]), x5 = splat(xr[5][xo + k]);
                                    a00 += x0 * w0; a01 += x0 * w1;
                                    a10 += x1 * w0; a11 += x1 * w1;
                                    a20 += x2 * w0; a21 += x2 * w1;
                                    a30 += x3 * w0; a31 += x3 * w1;
                                    a40 += x4 * w0; a41 += x4 * w1;
                                    a50 += x5 * w0; a51 += x5 * w1;
                                }
                                dest[0][0] = rnd_bf16(dest[0][0] + a00); dest[0][1] = rnd_bf16(dest[0][1] + a01);
                                dest[1][0] = rnd_bf16(dest[1][0] + a10); dest[1][1] = rnd_bf16(dest[1][1] + a11);
                                dest[2][0] = rnd_bf16(dest[2][0] + a20); dest[2][1] = rnd_bf16(dest[2][1] + a21);
                                dest[3][0] = rnd_bf16(dest[3][0] + a30); dest[3][1] = rnd_bf16(dest[3][1] + a31);
                                dest[4][0] = rnd_bf16(dest[4][0] + a40); dest[4][1] = rnd_bf16(dest[4][1] + a41);
                                dest[5][0] = rnd_bf16(dest[5][0] + a50); dest[5][1] = rnd_bf16(dest[5][1] + a51);
                            }
                        }
                    }
                    for (int64_t r = 0; r < mr; r++) {
                        float tmp[NB];
                        memcpy(tmp, &dest[r][0], 32);
                        memcpy(tmp + 8, &dest[r][1], 32);
                        memcpy(out + (b * M + m0 + r) * N + n0, tmp, nb * sizeof(float));
                    }
                }
            }
        }
        free(panel);
    }
}
