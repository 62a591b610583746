// llmpress CPU kernels for low-bit weights at small batch (decode): AVX2 + FMA, and AVX-512
// paths chosen at run time where the CPU has them (int4, int8, lookup tables).
//
// int4 layout ("llmpress-int4-b16"): weights [N, K] as codes q in 0..15, packed two per
// byte into uint8 [N, K/2]; within each block of 16 consecutive input columns, byte j
// (j = 0..7) holds column j in its low nibble and column j + 8 in its high nibble, so one
// 8-byte load widens to the 8 low and the 8 high columns of the block. Per group of
// `gs` columns (gs % 32 == 0) a float32 scale s and zero z give w = (q - z) * s (z = 8
// for symmetric codes). The products are summed per group, then scaled: the same
// float32 arithmetic as dequantize-then-multiply up to summation order.
//
// int8 layout: int8 [N, K] with one float32 scale per output row, w = q * s.
//
// Lookup tables (codebook weights, at most 16 entries): codes 0..15 as 4-bit nibbles of int32
// words [N, K/8] (column 8w + i at bits 4i..4i+3 of word w: the little-endian stream of
// llmpress.quant.pack at 4 bits), one float32 table of 16 entries per output row and group
// of `gs` columns (gs % 32 == 0), w = table[n, g, q]. The entries sit in one register (at
// most 8: one vpermps per 8 weights) or two (16: two vpermps and a blend on bit 3); the
// codes of 8 columns come from one broadcast load and a variable shift. No dense weight
// is formed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Unpack 16 columns (8 bytes) to two float vectors (q - z): low and high nibbles. 2^23 + q
// as a float holds q in its mantissa, so OR-ing the exponent in replaces a convert; z2
// holds 2^23 + z.
inline void unpack16(const uint8_t* p, __m256 z2, __m256& lo, __m256& hi) {
  const __m256i nib = _mm256_set1_epi32(0xF), magic = _mm256_set1_epi32(0x4B000000);
  const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(q, nib), magic)), z2);
  hi = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(q, 4), magic)), z2);
}

// One activation row against output rows [n0, n1): 32 columns per step, 4 chains.
void int4_rows1(const float* x, const uint8_t* w, const float* sc, const float* zp, float* y,
                int64_t n0, int64_t n1, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    __m256 tot = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256 z2 = _mm256_set1_ps(8388608.0f + zp[n * G + g]);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* xg = x + g * gs;
      const uint8_t* wg = wr + g * gs / 2;
      for (int64_t k = 0; k < gs; k += 32) {
        __m256 l0, h0, l1, h1;
        unpack16(wg + k / 2, z2, l0, h0);
        unpack16(wg + k / 2 + 8, z2, l1, h1);
        a0 = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xg + k), a0);
        a1 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xg + k + 8), a1);
        a2 = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xg + k + 16), a2);
        a3 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xg + k + 24), a3);
      }
      const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      tot = _mm256_fmadd_ps(a, _mm256_set1_ps(sc[n * G + g]), tot);
    }
    y[n] = hsum(tot);
  }
}

// MB (2..4) activation rows against output rows [n0, n1): each unpacked block serves all.
template <int MB>
void int4_rows(const float* x, int64_t ldx, const uint8_t* w, const float* sc, const float* zp,
               float* y, int64_t ldy, int64_t n0, int64_t n1, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    __m256 tot[MB], a[MB], b[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256 z2 = _mm256_set1_ps(8388608.0f + zp[n * G + g]);
      for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm256_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        __m256 lo, hi;
        unpack16(wr + k / 2, z2, lo, hi);
        for (int m = 0; m < MB; ++m) {
          a[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + k), a[m]);
          b[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + k + 8), b[m]);
        }
      }
      const __m256 s = _mm256_set1_ps(sc[n * G + g]);
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(a[m], b[m]), s, tot[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum(tot[m]);
  }
}

// AVX-512 (chosen at run time where the CPU has it; same layout): 32 columns, two blocks of
// 16, per step. One 16-byte load widens to 16 lanes whose low nibbles are columns 0-7 and
// 16-23 of the 32 and whose high nibbles are columns 8-15 and 24-31; the activation rows are
// permuted once per call into that order (permute_x32), so each half is one 16-float load.
__attribute__((target("avx512f"))) void permute_x32(const float* x, float* xp, int64_t n) {
  for (int64_t k = 0; k < n; k += 32)
    for (int j = 0; j < 8; ++j) {
      xp[k + j] = x[k + j];
      xp[k + 8 + j] = x[k + 16 + j];
      xp[k + 16 + j] = x[k + 8 + j];
      xp[k + 24 + j] = x[k + 24 + j];
    }
}

template <int MB>
__attribute__((target("avx512f"))) void int4_rows512(const float* xp, int64_t ldx, const uint8_t* w, const float* sc,
                                                     const float* zp, float* y, int64_t ldy, int64_t n0, int64_t n1,
                                                     int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  const __m512i nib = _mm512_set1_epi32(0xF), magic = _mm512_set1_epi32(0x4B000000);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    __m512 tot[MB], a[MB], b[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m512 z2 = _mm512_set1_ps(8388608.0f + zp[n * G + g]);
      for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
        const __m512 lo = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(q, nib), magic)), z2);
        const __m512 hi = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(q, 4), magic)), z2);
        for (int m = 0; m < MB; ++m) {
          a[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * ldx + k), a[m]);
          b[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * ldx + k + 16), b[m]);
        }
      }
      const __m512 s = _mm512_set1_ps(sc[n * G + g]);
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(a[m], b[m]), s, tot[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(tot[m]);
  }
}

__attribute__((target("avx512f"))) void int4_all512(const float* xp, const uint8_t* wp, const float* sp, const float* zp, float* yp,
                                                    int64_t M, int64_t N, int64_t K, int64_t gs, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int4_rows512<4>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs);
  switch (M - m) {
    case 3: int4_rows512<3>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs); break;
    case 2: int4_rows512<2>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs); break;
    case 1: int4_rows512<1>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs); break;
    default: break;
  }
}

template <int MB>
void int8_rows(const float* x, int64_t ldx, const int8_t* w, const float* sc, float* y, int64_t ldy,
               int64_t n0, int64_t n1, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256 acc[2][MB];
    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k))));
      const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k + 8))));
      for (int m = 0; m < MB; ++m) {
        acc[0][m] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + m * ldx + k), acc[0][m]);
        acc[1][m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + m * ldx + k + 8), acc[1][m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum(_mm256_add_ps(acc[0][m], acc[1][m])) * sc[n];
  }
}

// AVX-512: 32 columns per step (two 16-lane converts), two accumulator chains per row.
template <int MB>
__attribute__((target("avx512f"))) void int8_rows512(const float* x, int64_t ldx, const int8_t* w, const float* sc, float* y,
                                                     int64_t ldy, int64_t n0, int64_t n1, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m512 acc[2][MB];
    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
      const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16))));
      for (int m = 0; m < MB; ++m) {
        acc[0][m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[0][m]);
        acc[1][m] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * ldx + k + 16), acc[1][m]);
      }
    }
    if (k < K) {  // K % 32 == 16: one more 16-lane step
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
      for (int m = 0; m < MB; ++m) acc[0][m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[0][m]);
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) * sc[n];
  }
}

__attribute__((target("avx512f"))) void int8_all512(const float* xp, const int8_t* wp, const float* sp, float* yp, int64_t M, int64_t N,
                                                    int64_t K, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int8_rows512<4>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K);
  switch (M - m) {
    case 3: int8_rows512<3>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
    case 2: int8_rows512<2>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
    case 1: int8_rows512<1>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
    default: break;
  }
}

// 8 consecutive codes (the nibbles of one little-endian int32 word, column 8w + i at bits
// 4i..4i+3) looked up in T0 (and T1 for codes 8..15): a broadcast load, a variable shift and
// one vpermps (at most 8 entries) or two and a blend on bit 3 (16 entries).
template <bool WIDE>
inline __m256 lookup8(const int32_t* p, __m256 T0, __m256 T1) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nib = _mm256_set1_epi32(0xF);
  const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*p), shifts), nib);
  if (!WIDE) return _mm256_permutevar8x32_ps(T0, c);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(T0, c), _mm256_permutevar8x32_ps(T1, c), _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

// MB (1..4) activation rows against output rows [n0, n1): 32 columns (4 words) per step,
// 4 accumulator chains per row.
template <int MB, bool WIDE>
void lut_rows(const float* x, int64_t ldx, const int32_t* w, const float* tab, float* y, int64_t ldy,
              int64_t n0, int64_t n1, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * (K / 8);
    __m256 a[MB], b[MB], c[MB], d[MB];
    for (int m = 0; m < MB; ++m) a[m] = b[m] = c[m] = d[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const float* t = tab + (n * G + g) * 16;
      const __m256 T0 = _mm256_loadu_ps(t), T1 = _mm256_loadu_ps(t + 8);
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        const int32_t* p = wr + k / 8;
        const __m256 v0 = lookup8<WIDE>(p, T0, T1), v1 = lookup8<WIDE>(p + 1, T0, T1);
        const __m256 v2 = lookup8<WIDE>(p + 2, T0, T1), v3 = lookup8<WIDE>(p + 3, T0, T1);
        for (int m = 0; m < MB; ++m) {
          const float* xm = x + m * ldx + k;
          a[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xm), a[m]);
          b[m] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xm + 8), b[m]);
          c[m] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xm + 16), c[m]);
          d[m] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xm + 24), d[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum(_mm256_add_ps(_mm256_add_ps(a[m], b[m]), _mm256_add_ps(c[m], d[m])));
  }
}

// AVX-512 (chosen at run time where the CPU has it): all 16 entries in one register, one
// vpermps per 16 weights. Layout "pairs": per 16 columns a 64-bit word whose low half holds
// the even columns (nibble i = column 2i) and whose high half the odd ones, so a 64-bit
// broadcast and a 32-bit variable shift put column j in lane j.
__attribute__((target("avx512f"))) inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int MB>
__attribute__((target("avx512f"))) void lut_rows512(const float* x, int64_t ldx, const int32_t* w, const float* tab, float* y,
                                                    int64_t ldy, int64_t n0, int64_t n1, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t* wr = reinterpret_cast<const int64_t*>(w + n * (K / 8));
    __m512 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m512 T = _mm512_loadu_ps(tab + (n * G + g) * 16);
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        const int64_t* p = wr + k / 16;
        // vpermps reads only the low 4 bits of each lane's index: no mask needed after the shift
        const __m512 v0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(p[0]), shifts), T);
        const __m512 v1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(p[1]), shifts), T);
        for (int m = 0; m < MB; ++m) {
          a[m] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + m * ldx + k), a[m]);
          b[m] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + m * ldx + k + 16), b[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = hsum512(_mm512_add_ps(a[m], b[m]));
  }
}

__attribute__((target("avx512f"))) void lut_all512(const float* xp, const int32_t* wp, const float* tp, float* yp, int64_t M, int64_t N,
                                                   int64_t K, int64_t gs, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) lut_rows512<4>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs);
  switch (M - m) {
    case 3: lut_rows512<3>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    case 2: lut_rows512<2>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    case 1: lut_rows512<1>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    default: break;
  }
}

template <bool WIDE>
void lut_all(const float* xp, const int32_t* wp, const float* tp, float* yp, int64_t M, int64_t N, int64_t K, int64_t gs,
             int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) lut_rows<4, WIDE>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs);
  switch (M - m) {
    case 3: lut_rows<3, WIDE>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    case 2: lut_rows<2, WIDE>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    case 1: lut_rows<1, WIDE>(xp + m * K, K, wp, tp, yp + m * N, N, n0, n1, K, gs); break;
    default: break;
  }
}

int64_t grain(int64_t N) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(16, (N + 4 * t - 1) / (4 * t));
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "x must be a contiguous float32 [M, ", K, "] tensor");
}

}  // namespace

bool cpu_avx512() { return __builtin_cpu_supports("avx512f"); }

// avx512: 1 the AVX-512 path (refused where the CPU lacks it), 0 the AVX2 one, -1 (default)
// AVX-512 where the CPU has it.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& zeros, int64_t gs, int64_t avx512) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(gs > 0 && gs % 32 == 0 && K % gs == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (K / gs), "scales must be float32 [N, K/gs]");
  TORCH_CHECK(zeros.scalar_type() == at::kFloat && zeros.is_contiguous() && zeros.numel() == N * (K / gs), "zeros must be float32 [N, K/gs]");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(avx512 != 1 || cpu_avx512(), "avx512=1: this CPU has no AVX-512");
  if (avx512 != 0 && cpu_avx512()) {
    std::vector<float> xperm(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) permute_x32(xp + m * K, xperm.data() + m * K, K);
    const float* xq = xperm.data();
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) { int4_all512(xq, wp, sp, zp, yp, M, N, K, gs, n0, n1); });
    return y;
  }
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int4_rows<4>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs);
    switch (M - m) {
      case 3: int4_rows<3>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs); break;
      case 2: int4_rows<2>(xp + m * K, K, wp, sp, zp, yp + m * N, N, n0, n1, K, gs); break;
      case 1: int4_rows1(xp + m * K, wp, sp, zp, yp + m * N, n0, n1, K, gs); break;
      default: break;
    }
  });
  return y;
}

at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t gs) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / gs;
  TORCH_CHECK(gs > 0 && gs % 16 == 0 && K % gs == 0, "group size must be a multiple of 16 dividing K");
  at::Tensor w = at::empty({N, K}, scales.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += 16) {
        const int64_t g = n * G + k / gs;
        const float s = sp[g], z = zp[g];
        for (int j = 0; j < 8; ++j) {
          const uint8_t b = wp[n * (K / 2) + k / 2 + j];
          out[n * K + k + j] = (float(b & 0xF) - z) * s;
          out[n * K + k + j + 8] = (float(b >> 4) - z) * s;
        }
      }
  });
  return w;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t avx512) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(), "codes must be contiguous int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(K % 16 == 0, "K must be a multiple of 16");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N, "scales must be float32 [N]");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(avx512 != 1 || cpu_avx512(), "avx512=1: this CPU has no AVX-512");
  if (avx512 != 0 && cpu_avx512()) {
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) { int8_all512(xp, wp, sp, yp, M, N, K, n0, n1); });
    return y;
  }
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int8_rows<4>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K);
    switch (M - m) {
      case 3: int8_rows<3>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
      case 2: int8_rows<2>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
      case 1: int8_rows<1>(xp + m * K, K, wp, sp, yp + m * N, N, n0, n1, K); break;
      default: break;
    }
  });
  return y;
}

void check_lut(const at::Tensor& packed, const at::Tensor& table, int64_t gs) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kInt && packed.is_contiguous(), "packed must be contiguous int32 [N, K/8]");
  const int64_t N = packed.size(0), K = packed.size(1) * 8;
  TORCH_CHECK(gs > 0 && gs % 32 == 0 && K % gs == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == N * (K / gs) * 16, "table must be float32 [N, K/gs, 16]");
}

bool lut_avx512() { return cpu_avx512(); }

// layout 0: column 8w + i at nibble i of word w; layout 1 ("pairs", AVX-512 only): per 16
// columns, nibble i of the even word = column 2i, of the odd word = column 2i + 1.
at::Tensor lut4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& table, int64_t gs, int64_t entries, int64_t layout) {
  check_lut(packed, table, gs);
  TORCH_CHECK(entries >= 1 && entries <= 16, "a table holds 1 to 16 entries");
  TORCH_CHECK(layout == 0 || (layout == 1 && lut_avx512()), "layout 1 needs AVX-512");
  const int64_t N = packed.size(0), K = packed.size(1) * 8, M = x.size(0);
  check_x(x, K);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* tp = table.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    if (layout == 1)
      lut_all512(xp, wp, tp, yp, M, N, K, gs, n0, n1);
    else if (entries > 8)
      lut_all<true>(xp, wp, tp, yp, M, N, K, gs, n0, n1);
    else
      lut_all<false>(xp, wp, tp, yp, M, N, K, gs, n0, n1);
  });
  return y;
}

at::Tensor lut4_dequant(const at::Tensor& packed, const at::Tensor& table, int64_t gs, int64_t layout) {
  check_lut(packed, table, gs);
  TORCH_CHECK(layout == 0 || layout == 1, "layout must be 0 or 1");
  const int64_t N = packed.size(0), K = packed.size(1) * 8, G = K / gs;
  at::Tensor w = at::empty({N, K}, table.options());
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* tp = table.data_ptr<float>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += 8) {
        const float* t = tp + (n * G + k / gs) * 16;
        const uint32_t word = static_cast<uint32_t>(wp[n * (K / 8) + k / 8]);
        for (int i = 0; i < 8; ++i) {
          const int64_t col = layout == 0 ? k + i : (k & ~int64_t(15)) + 2 * i + ((k >> 3) & 1);
          out[n * K + col] = t[(word >> (4 * i)) & 0xF];
        }
      }
  });
  return w;
}

// vq_cpu.cpp
bool vq16_avx512();
std::vector<int64_t> vq_direct_from(int64_t k16, int64_t tree, int64_t gather);
at::Tensor vq_quad_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups);
at::Tensor vq16_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                   int64_t avx512);
at::Tensor vq8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                  int64_t avx512);
at::Tensor vq_dequant(const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq16_mm", &vq16_mm, "x [M,K] f32 @ 16-codeword VQ weights (codes uint8 [N/16,K/d,8], tables f32 [G,d,16], scale [N])^T -> [M,N]",
        py::arg("x"), py::arg("codes"), py::arg("tables"), py::arg("scale"), py::arg("row_groups") = 1, py::arg("avx512") = -1);
  m.def("vq8_mm", &vq8_mm, "x [M,K] f32 @ VQ weights of 16..256 codewords (codes uint8 [N/16,K/d,16], tables f32 [G,d,C], scale [N])^T -> [M,N]",
        py::arg("x"), py::arg("codes"), py::arg("tables"), py::arg("scale"), py::arg("row_groups") = 1, py::arg("avx512") = -1);
  m.def("vq_dequant", &vq_dequant, "either VQ code layout (uint8 [N/16,V,8|16]) and tables f32 [G,K,d], scale [N] -> float32 [N, V d]",
        py::arg("codes"), py::arg("tables"), py::arg("scale"), py::arg("row_groups") = 1);
  m.def("vq_direct_from", &vq_direct_from,
        "activation rows from which vq16_mm / vq8_mm (tree: 32-64 codewords, gather: 128-256) share one weight lookup among the rows; "
        "each argument > 0 sets it; returns the previous [vq16, tree, gather]",
        py::arg("vq16") = 0, py::arg("tree") = 0, py::arg("gather") = 0);
  m.def("vq_quad_mm", &vq_quad_mm, "as vq8_mm for vectors of 4k coordinates (AVX-512): tables f32 [G,K,d] not transposed",
        py::arg("x"), py::arg("codes"), py::arg("tables"), py::arg("scale"), py::arg("row_groups") = 1);
  m.def("vq16_avx512", &vq16_avx512, "whether the AVX-512 path of vq16_mm runs here");
  m.def("lut4_mm", &lut4_mm, "x [M,K] f32 @ table lookups (4-bit codes in int32 words, f32 [N,G,16] tables) [N,K]^T -> [M,N]");
  m.def("cpu_avx512", &cpu_avx512, "whether this CPU has AVX-512 (the int4 and lookup-table kernels' AVX-512 paths)");
  m.def("lut_avx512", &lut_avx512, "whether the AVX-512 lookup-table path (layout 1) runs here");
  m.def("lut4_dequant", &lut4_dequant, "table lookups (4-bit codes in int32 words, f32 [N,G,16] tables) -> float32 [N,K]");
  m.def("int4_mm", &int4_mm, "x [M,K] f32 @ int4 (llmpress-int4-b16) [N,K]^T -> [M,N]; avx512: -1 where the CPU has it, 0 AVX2, 1 AVX-512",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("gs"), py::arg("avx512") = -1);
  m.def("int4_dequant", &int4_dequant, "int4 (llmpress-int4-b16) -> float32 [N,K]");
  m.def("int8_mm", &int8_mm, "x [M,K] f32 @ (int8 [N,K] * scale[N])^T -> [M,N]; avx512 as int4_mm", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("avx512") = -1);
}
