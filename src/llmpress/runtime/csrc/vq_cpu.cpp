// llmpress CPU kernel for vector-quantized weights with 16 codewords (the ``vq`` storage form at
// d * b = 4 index bits: 2-d vectors at 2 bits per weight, 4-d at 1 bit) at small batch
// (decode), by lookup tables of the activations rather than of the weights (as T-MAC):
//
//   P[m, v, k] = sum_t x[m, v d + t] T[g(v), k, t]          (d multiply-adds of 16 lanes per vector)
//   y[m, n]    = s[n] sum_v P[m, v, code[n, v]]              (one register lookup per 16 rows)
//
// so a vector of d weights costs one table read and one add, and no dense weight is formed.
// Layout "vq16-r16": the codes of 16 consecutive output rows for one vector in 8 bytes, byte j
// holding row j (low nibble) and row j + 8 (high nibble): uint8 [N / 16, V, 8]. AVX-512: the
// 16 entries of P[m, v] sit in one register; one 8-byte load widened to 16 lanes, a variable
// shift, and one vpermps look up 16 rows at once (vpermps reads the low 4 bits of each lane).
// Elsewhere a scalar loop over the same layout. From a dozen activation rows (32..256
// codewords: from 3) the direct path looks each weight up once for all rows instead
// (vq_direct_rows512), and vectors of 4k coordinates have their own (vq_quad_mm: codeword
// quarters loaded 128 bits at a time, no gathers). Float32 throughout: the outputs equal the
// dequantized weight's product up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// Every function of the tables path adds the unscaled sums over the vectors [v0, v1) into y
// (one thread's partial result, zeroed by the driver); the driver adds the threads' parts and
// applies the row scale.
template <int MB>
__attribute__((target("avx512f"))) void vq16_block512(const float* P, int64_t ldp, const uint8_t* codes, float* y, int64_t ldy, int64_t nb,
                                                      int64_t V, int64_t v0, int64_t v1) {
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  __m512 a[MB], b[MB];
  for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm512_setzero_ps();
  const uint8_t* c = codes + nb * V * 8;
  int64_t v = v0;
  for (; v + 2 <= v1; v += 2) {
    const __m128i c0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8));
    const __m128i c1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8 + 8));
    const __m512i i0 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c0, c0)), shifts);
    const __m512i i1 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c1, c1)), shifts);
    for (int m = 0; m < MB; ++m) {
      a[m] = _mm512_add_ps(a[m], _mm512_permutexvar_ps(i0, _mm512_loadu_ps(P + m * ldp + v * 16)));
      b[m] = _mm512_add_ps(b[m], _mm512_permutexvar_ps(i1, _mm512_loadu_ps(P + m * ldp + v * 16 + 16)));
    }
  }
  if (v < v1) {
    const __m128i c0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8));
    const __m512i i0 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c0, c0)), shifts);
    for (int m = 0; m < MB; ++m) a[m] = _mm512_add_ps(a[m], _mm512_permutexvar_ps(i0, _mm512_loadu_ps(P + m * ldp + v * 16)));
  }
  for (int m = 0; m < MB; ++m) {
    float* o = y + m * ldy + nb * 16;
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(a[m], b[m])));
  }
}

__attribute__((target("avx512f"))) void vq16_rows512(const float* P, const uint8_t* codes, float* y, int64_t M, int64_t N, int64_t V,
                                                     int64_t nb0, int64_t nb1, int64_t v0, int64_t v1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) vq16_block512<4>(P + m * V * 16, V * 16, codes, y + m * N, N, nb, V, v0, v1);
    switch (M - m) {
      case 3: vq16_block512<3>(P + m * V * 16, V * 16, codes, y + m * N, N, nb, V, v0, v1); break;
      case 2: vq16_block512<2>(P + m * V * 16, V * 16, codes, y + m * N, N, nb, V, v0, v1); break;
      case 1: vq16_block512<1>(P + m * V * 16, V * 16, codes, y + m * N, N, nb, V, v0, v1); break;
      default: break;
    }
  }
}

void vq16_rows(const float* P, const uint8_t* codes, float* y, int64_t M, int64_t N, int64_t V, int64_t nb0, int64_t nb1, int64_t v0,
               int64_t v1) {
  for (int64_t nb = nb0; nb < nb1; ++nb)
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 16; ++j) {
        float acc = 0.f;
        for (int64_t v = v0; v < v1; ++v) {
          const uint8_t byte = codes[(nb * V + v) * 8 + (j & 7)];
          acc += P[(m * V + v) * 16 + (j < 8 ? byte & 0xF : byte >> 4)];
        }
        y[m * N + nb * 16 + j] += acc;
      }
}


// ---- 32..256 codewords (d * b = 5..8 index bits: 2-d at 3 bits, 4-d at 2 bits) ----------------
// Layout "vq8-r16": one byte per code, the codes of 16 consecutive output rows for one vector
// in 16 bytes: uint8 [N / 16, V, 16]. P[m, v] holds K entries (too many for a register), so
// AVX-512 looks 16 rows up at once with one gather (vgatherdps) from P[m, v, :].

// The K = 16 NR entries of P[m, v] looked up for 16 rows without a gather: vpermt2ps picks from
// a pair of registers by the code's low 5 bits, then blends by bits 5, 6 and 7 halve the pairs.
template <int NR>
__attribute__((target("avx512f"))) inline __m512 vq8_tree(const float* p, __m512i idx) {
  __m512 r[NR / 2];
  for (int i = 0; i < NR / 2; ++i) r[i] = _mm512_permutex2var_ps(_mm512_loadu_ps(p + 32 * i), idx, _mm512_loadu_ps(p + 32 * i + 16));
  int bit = 32;
  for (int n = NR / 2; n > 1; n /= 2, bit *= 2) {
    const __mmask16 k = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(bit));
    for (int i = 0; i < n / 2; ++i) r[i] = _mm512_mask_blend_ps(k, r[2 * i], r[2 * i + 1]);
  }
  return r[0];
}

template <int MB, int NR>
__attribute__((target("avx512f"))) void vq8_tree_block512(const float* P, int64_t ldp, const uint8_t* codes, float* y, int64_t ldy, int64_t nb,
                                                          int64_t V, int64_t v0, int64_t v1) {
  constexpr int K = NR * 16;
  __m512 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm512_setzero_ps();
  const uint8_t* c = codes + nb * V * 16;
  for (int64_t v = v0; v < v1; ++v) {
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + v * 16)));
    for (int m = 0; m < MB; ++m) a[m] = _mm512_add_ps(a[m], vq8_tree<NR>(P + m * ldp + v * K, i0));
  }
  for (int m = 0; m < MB; ++m) {
    float* o = y + m * ldy + nb * 16;
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[m]));
  }
}

template <int NR>
__attribute__((target("avx512f"))) void vq8_tree_rows512(const float* P, const uint8_t* codes, float* y, int64_t M, int64_t N, int64_t V,
                                                         int64_t nb0, int64_t nb1, int64_t v0, int64_t v1) {
  const int64_t ldp = V * NR * 16;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) vq8_tree_block512<2, NR>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, v0, v1);
    if (m < M) vq8_tree_block512<1, NR>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, v0, v1);
  }
}

// The gather path in chunks of vectors: P[m, c0..c1) of every activation row fits in L1 (P of a
// whole row is V KB at 256 codewords, an L2-sized array that each block of 16 rows would
// otherwise re-read), every block of rows runs over the chunk, partial sums kept in y.
// 2.2x the unchunked loop on a 576 x 1536 layer.
template <int MB>
__attribute__((target("avx512f"))) void vq8_chunk512(const float* P, int64_t ldp, const uint8_t* codes, float* y, int64_t ldy, int64_t nb,
                                                     int64_t V, int64_t K, int64_t c0, int64_t c1) {
  __m512 a[MB], b[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm512_loadu_ps(y + m * ldy + nb * 16), b[m] = _mm512_setzero_ps();
  const uint8_t* c = codes + nb * V * 16;
  int64_t v = c0;
  for (; v + 2 <= c1; v += 2) {
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + v * 16)));
    const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + v * 16 + 16)));
    for (int m = 0; m < MB; ++m) {
      a[m] = _mm512_add_ps(a[m], _mm512_i32gather_ps(i0, P + m * ldp + v * K, 4));
      b[m] = _mm512_add_ps(b[m], _mm512_i32gather_ps(i1, P + m * ldp + (v + 1) * K, 4));
    }
  }
  if (v < c1) {
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + v * 16)));
    for (int m = 0; m < MB; ++m) a[m] = _mm512_add_ps(a[m], _mm512_i32gather_ps(i0, P + m * ldp + v * K, 4));
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * ldy + nb * 16, _mm512_add_ps(a[m], b[m]));
}

__attribute__((target("avx512f"))) void vq8_rows512(const float* P, const uint8_t* codes, float* y, int64_t M, int64_t N, int64_t V, int64_t K,
                                                    int64_t nb0, int64_t nb1, int64_t v0, int64_t v1) {
  const int64_t ldp = V * K;
  const int64_t chunk = std::max<int64_t>(2, (32 * 1024 / 4) / (M * K));  // 32 KB of P per chunk
  for (int64_t c0 = v0; c0 < v1; c0 += chunk) {
    const int64_t c1 = std::min(v1, c0 + chunk);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) vq8_chunk512<4>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, K, c0, c1);
      switch (M - m) {
        case 3: vq8_chunk512<3>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, K, c0, c1); break;
        case 2: vq8_chunk512<2>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, K, c0, c1); break;
        case 1: vq8_chunk512<1>(P + m * ldp, ldp, codes, y + m * N, N, nb, V, K, c0, c1); break;
        default: break;
      }
    }
  }
}

// ---- the direct path (more activation rows): the weights of 16 rows looked up once per
// coordinate and shared by every activation row -------------------------------------------
// For each vector v and coordinate t the 16 rows' weights w = T[g(v), code[n, v], t] come from
// one lookup (vq16: a vpermps from the table's register; vq8: a gather from the L1-resident
// table), then MB activation rows each take one FMA. No activation tables are built, so the
// cost per weight falls with the batch as a GEMM's does; the tables path costs a lookup per
// activation row and vector.
template <int MB, bool NIB>
__attribute__((target("avx512f"))) void vq_direct_block512(const float* x, int64_t ldx, const uint8_t* codes, const float* Tt, const float* scale,
                                                           float* y, int64_t ldy, int64_t nb, int64_t V, int64_t d, int64_t K, int64_t per) {
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  __m512 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm512_setzero_ps();
  const int64_t cb = NIB ? 8 : 16;
  const uint8_t* c = codes + nb * V * cb;
  for (int64_t v = 0; v < V; ++v) {
    __m512i idx;
    if (NIB) {
      const __m128i c0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8));
      idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c0, c0)), shifts);  // vpermps reads the low 4 bits
    } else {
      idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + v * 16)));
    }
    const float* t = Tt + (v / per) * d * K;
    const float* xv = x + v * d;
    for (int64_t j = 0; j < d; ++j) {
      const __m512 w = NIB ? _mm512_permutexvar_ps(idx, _mm512_loadu_ps(t + j * 16)) : _mm512_i32gather_ps(idx, t + j * K, 4);
      for (int m = 0; m < MB; ++m) a[m] = _mm512_fmadd_ps(_mm512_set1_ps(xv[m * ldx + j]), w, a[m]);
    }
  }
  const __m512 s = _mm512_loadu_ps(scale + nb * 16);
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * ldy + nb * 16, _mm512_mul_ps(a[m], s));
}

// The direct path without gathers for vectors of 4k coordinates (the codes of 16 rows index
// codewords of whole 128-bit quarters): one register holds the 4-coordinate quarter of 4
// rows' codewords (one load and three 128-bit inserts), one FMA with the activation quarter
// broadcast to the 4 lanes; the 4 coordinates of each row are summed once at the end. A
// gather per 16 rows and coordinate (vgatherdps: ~20 cycles for 16 lanes on Zen 4, microcoded on Xeons with the GDS fix)
// costs several times these loads.
template <int MB>
__attribute__((target("avx512f"))) void vq_quad_block512(const float* x, int64_t ldx, const uint8_t* codes, const float* T, const float* scale,
                                                         float* y, int64_t ldy, int64_t nb, int64_t V, int64_t d, int64_t K, int64_t per) {
  __m512 a[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int z = 0; z < 4; ++z) a[m][z] = _mm512_setzero_ps();
  const uint8_t* c = codes + nb * V * 16;
  for (int64_t v = 0; v < V; ++v) {
    const uint8_t* cv = c + v * 16;
    const float* tg = T + (v / per) * K * d;
    for (int64_t h = 0; h < d; h += 4) {
      __m512 w[4];
      for (int z = 0; z < 4; ++z) {
        __m512 r = _mm512_castps128_ps512(_mm_loadu_ps(tg + cv[4 * z] * d + h));
        r = _mm512_insertf32x4(r, _mm_loadu_ps(tg + cv[4 * z + 1] * d + h), 1);
        r = _mm512_insertf32x4(r, _mm_loadu_ps(tg + cv[4 * z + 2] * d + h), 2);
        w[z] = _mm512_insertf32x4(r, _mm_loadu_ps(tg + cv[4 * z + 3] * d + h), 3);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * ldx + v * d + h));
        for (int z = 0; z < 4; ++z) a[m][z] = _mm512_fmadd_ps(w[z], xb, a[m][z]);
      }
    }
  }
  alignas(64) float tmp[64];
  for (int m = 0; m < MB; ++m) {
    for (int z = 0; z < 4; ++z) _mm512_store_ps(tmp + 16 * z, a[m][z]);
    for (int j = 0; j < 16; ++j)
      y[m * ldy + nb * 16 + j] = scale[nb * 16 + j] * ((tmp[4 * j] + tmp[4 * j + 1]) + (tmp[4 * j + 2] + tmp[4 * j + 3]));
  }
}

// blk(std::integral_constant<int, MB>, m) over the activation rows in blocks of BIG, then 4, 3, 2, 1.
template <int BIG, class Blk>
inline void by_row_blocks(int64_t M, Blk blk) {
  int64_t m = 0;
  for (; m + BIG <= M; m += BIG) blk(std::integral_constant<int, BIG>{}, m);
  for (; m + 4 <= M; m += 4) blk(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: blk(std::integral_constant<int, 3>{}, m); break;
    case 2: blk(std::integral_constant<int, 2>{}, m); break;
    case 1: blk(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

void vq_quad_rows512(const float* x, const uint8_t* codes, const float* T, const float* scale, float* y, int64_t M, int64_t N, int64_t V,
                     int64_t d, int64_t K, int64_t per, int64_t nb0, int64_t nb1) {
  const int64_t ldx = V * d;
  for (int64_t nb = nb0; nb < nb1; ++nb)
    by_row_blocks<6>(M, [&](auto mb, int64_t m) {
      vq_quad_block512<decltype(mb)::value>(x + m * ldx, ldx, codes, T, scale, y + m * N, N, nb, V, d, K, per);
    });
}

template <bool NIB>
void vq_direct_rows512(const float* x, const uint8_t* codes, const float* Tt, const float* scale, float* y, int64_t M, int64_t N, int64_t V,
                       int64_t d, int64_t K, int64_t per, int64_t nb0, int64_t nb1) {
  const int64_t ldx = V * d;
  for (int64_t nb = nb0; nb < nb1; ++nb)
    by_row_blocks<12>(M, [&](auto mb, int64_t m) {
      vq_direct_block512<decltype(mb)::value, NIB>(x + m * ldx, ldx, codes, Tt, scale, y + m * N, N, nb, V, d, K, per);
    });
}

void vq8_rows(const float* P, const uint8_t* codes, float* y, int64_t M, int64_t N, int64_t V, int64_t K, int64_t nb0, int64_t nb1, int64_t v0,
              int64_t v1) {
  for (int64_t nb = nb0; nb < nb1; ++nb)
    for (int64_t m = 0; m < M; ++m) {
      float acc[16] = {0.f};
      for (int64_t v = v0; v < v1; ++v) {
        const uint8_t* c = codes + (nb * V + v) * 16;
        const float* p = P + (m * V + v) * K;
        for (int j = 0; j < 16; ++j) acc[j] += p[c[j]];
      }
      for (int j = 0; j < 16; ++j) y[m * N + nb * 16 + j] += acc[j];
    }
}

// P[m, v] for the vectors [v0, v1) (P laid out [M, V, K]) from x [M, V d] and the tables
// transposed to Tt [G, d, K] (V / G vectors per group; K a multiple of 16).
__attribute__((target("avx512f"))) void vq_tables512(const float* x, const float* Tt, float* P, int64_t M, int64_t V, int64_t d, int64_t G,
                                                     int64_t K, int64_t v0, int64_t v1) {
  const int64_t per = V / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = v0; v < v1; ++v) {
      const float* t = Tt + (v / per) * d * K;
      const float* xv = x + m * V * d + v * d;
      float* p = P + (m * V + v) * K;
      for (int64_t k = 0; k < K; k += 16) {
        __m512 acc = _mm512_mul_ps(_mm512_set1_ps(xv[0]), _mm512_loadu_ps(t + k));
        for (int64_t j = 1; j < d; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(xv[j]), _mm512_loadu_ps(t + j * K + k), acc);
        _mm512_storeu_ps(p + k, acc);
      }
    }
}

void vq_tables(const float* x, const float* Tt, float* P, int64_t M, int64_t V, int64_t d, int64_t G, int64_t K, int64_t v0, int64_t v1) {
  const int64_t per = V / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t k = 0; k < K; ++k) {
        float acc = 0.f;
        for (int64_t j = 0; j < d; ++j) acc += x[m * V * d + v * d + j] * Tt[((v / per) * d + j) * K + k];
        P[(m * V + v) * K + k] = acc;
      }
}

}  // namespace

bool vq16_avx512() { return __builtin_cpu_supports("avx512f"); }

// Activation rows from which the direct path runs (AVX-512): measured per layout on the Xeon
// (runs/kbench/vqbench.py); below, the activation tables.
// vq_direct_from() reads and sets them (tests and benchmarks force either path).
int64_t kDirect16 = 12, kDirectTree = 12, kDirectGather = 3;

std::vector<int64_t> vq_direct_from(int64_t k16, int64_t tree, int64_t gather) {
  std::vector<int64_t> old{kDirect16, kDirectTree, kDirectGather};
  if (k16 > 0) kDirect16 = k16;
  if (tree > 0) kDirectTree = tree;
  if (gather > 0) kDirectGather = gather;
  return old;
}

namespace {

// What both drivers check and need: x [M, V d], codes uint8 [N / 16, V, cb] (cb bytes per
// block of 16 rows and vector), tables float32 [G, d, K] (G = RG row groups x GC column groups),
// scale float32 [N].
struct VQCall {
  int64_t G, d, K, V, NB, N, RG, GC, M;
  bool wide;
};

VQCall vq_check(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                int64_t avx512, int64_t cb, bool kd = false) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == cb,
              "codes must be contiguous uint8 [N/16, V, ", cb, "]");
  TORCH_CHECK(tables.dim() == 3 && tables.scalar_type() == at::kFloat && tables.is_contiguous(), "tables must be contiguous float32 ",
              kd ? "[G, K, d]" : "[G, d, K]");
  VQCall c{};
  c.G = tables.size(0), c.d = tables.size(kd ? 2 : 1), c.K = tables.size(kd ? 1 : 2), c.V = codes.size(1), c.NB = codes.size(0), c.N = c.NB * 16;
  c.RG = row_groups;
  TORCH_CHECK(c.RG >= 1 && c.G % c.RG == 0 && c.NB % c.RG == 0, "row_groups=", c.RG, " must divide the ", c.G, " tables and the ", c.NB,
              " blocks of 16 rows");
  c.GC = c.G / c.RG;
  TORCH_CHECK(c.d >= 1 && c.GC >= 1 && c.V % c.GC == 0, "the ", c.V, " vectors per row do not split into ", c.GC, " groups");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == c.V * c.d,
              "x must be a contiguous float32 [M, ", c.V * c.d, "] tensor");
  c.M = x.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == c.N,
              "scale must be float32 [N]");
  TORCH_CHECK(avx512 == -1 || avx512 == 0 || (avx512 == 1 && vq16_avx512()), "avx512=1 needs a CPU with AVX-512");
  c.wide = avx512 == 1 || (avx512 == -1 && vq16_avx512());
  return c;
}

// y [M, N] from ``rows(r, y, nb0, nb1)`` over runs of blocks of 16 rows within one row group r,
// in parallel.
template <class Rows>
at::Tensor vq_blocks(const VQCall& c, const at::Tensor& x, Rows rows) {
  at::Tensor y = at::empty({c.M, c.N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = c.NB / c.RG;  // blocks of 16 rows per row group
  at::parallel_for(0, c.NB, std::max<int64_t>(1, (c.NB + 4 * t - 1) / (4 * t)), [&](int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1;) {
      const int64_t r = nb / per, end = std::min(nb1, (r + 1) * per);
      rows(r, yp, nb, end);
      nb = end;
    }
  });
  return y;
}

// The activation-tables path. The vectors are split into one part per thread; each thread builds
// P[m, v] = x[m, vector v] . T[g(v), :] for its part in its own buffer (kept between calls: a
// fresh allocation per call came back cold or freshly mapped on every layer of a decode step),
// adds its part's sums over every block of rows into its own partial y, and the parts are added
// and scaled at the end. Built by one thread and read by all (split over the rows instead), P
// crossed between the cores' caches on every call: 1.7x slower at batch 1 on 384-vector rows
// with 256 codewords, where P is 384 KB. ``rows(P, y, nb0, nb1, v0, v1)`` runs one row group.
template <class Rows>
at::Tensor vq_drive(const VQCall& c, const at::Tensor& x, const at::Tensor& tables, const at::Tensor& scale, int64_t slack, Rows rows) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), c.V / 16));
  const int64_t per = c.NB / c.RG, plane = c.M * c.V * c.K, MN = c.M * c.N;
  at::Tensor part = at::zeros({T, c.M, c.N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = tables.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t p0, int64_t p1) {
    static thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>(c.RG * plane + slack);
    if (buf.size() < need) buf.resize(need);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t v0 = c.V * p / T, v1 = c.V * (p + 1) / T;
      for (int64_t r = 0; r < c.RG; ++r) {
        float* P = buf.data() + r * plane;
        const float* tr = tp + r * c.GC * c.d * c.K;
        if (c.wide)
          vq_tables512(xp, tr, P, c.M, c.V, c.d, c.GC, c.K, v0, v1);
        else
          vq_tables(xp, tr, P, c.M, c.V, c.d, c.GC, c.K, v0, v1);
        rows(P, pp + p * MN, r * per, (r + 1) * per, v0, v1);
      }
    }
  });
  at::Tensor y = at::empty({c.M, c.N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  for (int64_t i = 0; i < MN; ++i) yp[i] = pp[i];
  for (int64_t p = 1; p < T; ++p)
    for (int64_t i = 0; i < MN; ++i) yp[i] += pp[p * MN + i];
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) yp[m * c.N + n] *= sp[n];
  return y;
}

// The direct paths (each row group reads its own tables: [G, d, K], or [G, K, d] for kQuad).
enum Direct { kNibbles, kGather, kQuad };
at::Tensor vq_direct(const VQCall& c, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, Direct how) {
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* tp = tables.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const int64_t per_g = c.V / c.GC;
  return vq_blocks(c, x, [&](int64_t r, float* yp, int64_t nb0, int64_t nb1) {
    const float* tr = tp + r * c.GC * c.d * c.K;
    if (how == kQuad)
      vq_quad_rows512(xp, cp, tr, sp, yp, c.M, c.N, c.V, c.d, c.K, per_g, nb0, nb1);
    else if (how == kNibbles)
      vq_direct_rows512<true>(xp, cp, tr, sp, yp, c.M, c.N, c.V, c.d, c.K, per_g, nb0, nb1);
    else
      vq_direct_rows512<false>(xp, cp, tr, sp, yp, c.M, c.N, c.V, c.d, c.K, per_g, nb0, nb1);
  });
}

}  // namespace

// x: float32 [M, K]; codes: uint8 [N / 16, V, 8] ("vq16-r16", V = K / d); tables: float32
// [G, d, 16] (the codewords transposed: entry k of coordinate t at [g, t, k]; G = row_groups
// blocks of N / row_groups rows times the column groups, row-group major); scale: float32 [N];
// avx512: -1 where the CPU has it, 0 the scalar loops, 1 AVX-512 (refused where the CPU lacks
// it). Returns y float32 [M, N].
at::Tensor vq16_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                   int64_t avx512) {
  const VQCall c = vq_check(x, codes, tables, scale, row_groups, avx512, 8);
  TORCH_CHECK(c.K == 16, "tables must be contiguous float32 [G, d, 16]");
  if (c.wide && c.M >= kDirect16) return vq_direct(c, x, codes, tables, scale, kNibbles);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  return vq_drive(c, x, tables, scale, 0, [&](const float* P, float* yp, int64_t nb0, int64_t nb1, int64_t v0, int64_t v1) {
    if (c.wide)
      vq16_rows512(P, cp, yp, c.M, c.N, c.V, nb0, nb1, v0, v1);
    else
      vq16_rows(P, cp, yp, c.M, c.N, c.V, nb0, nb1, v0, v1);
  });
}

// As vq16_mm for 32..256 codewords (K a multiple of 16): codes uint8 [N / 16, V, 16] ("vq8-r16",
// byte j of [nb, v] is row nb * 16 + j's code for vector v); tables float32 [G, d, K].
at::Tensor vq8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                  int64_t avx512) {
  const VQCall c = vq_check(x, codes, tables, scale, row_groups, avx512, 16);
  TORCH_CHECK(c.K >= 16 && c.K <= 256 && c.K % 16 == 0, "the tables hold ", c.K, " codewords; vq8_mm takes 16..256 in steps of 16");
  // 32 and 64 codewords: the register tree (2.4x the gather's speed at 64); 128 and 256: the
  // gather (the tree's 16 loads and 15 shuffles per vector lose to it at 256)
  const bool tree = c.K <= 64;
  if (c.wide && c.M >= (tree ? kDirectTree : kDirectGather)) return vq_direct(c, x, codes, tables, scale, kGather);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  // codes are bytes: 256 floats of slack after P keep a code >= K (refused where the codes are
  // packed, not re-checked per call) inside the buffer
  return vq_drive(c, x, tables, scale, 256, [&](const float* P, float* yp, int64_t nb0, int64_t nb1, int64_t v0, int64_t v1) {
    if (c.wide && tree && c.K == 32)
      vq8_tree_rows512<2>(P, cp, yp, c.M, c.N, c.V, nb0, nb1, v0, v1);
    else if (c.wide && tree && c.K == 64)
      vq8_tree_rows512<4>(P, cp, yp, c.M, c.N, c.V, nb0, nb1, v0, v1);
    else if (c.wide)
      vq8_rows512(P, cp, yp, c.M, c.N, c.V, c.K, nb0, nb1, v0, v1);
    else
      vq8_rows(P, cp, yp, c.M, c.N, c.V, c.K, nb0, nb1, v0, v1);
  });
}

// The dense weight of either code layout (prefill: one GEMM after it): codes "vq16-r16" uint8
// [N / 16, V, 8] (nibbles) or "vq8-r16" uint8 [N / 16, V, 16]; tables float32 [G, K, d] (not
// transposed); scale float32 [N]. Returns float32 [N, V d], w[n, v d + t] = s[n] T[g, code, t].
at::Tensor vq_dequant(const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && (codes.size(2) == 8 || codes.size(2) == 16),
              "codes must be contiguous uint8 [N/16, V, 8] or [N/16, V, 16]");
  TORCH_CHECK(tables.dim() == 3 && tables.scalar_type() == at::kFloat && tables.is_contiguous(), "tables must be contiguous float32 [G, K, d]");
  const bool nibbles = codes.size(2) == 8;
  const int64_t G = tables.size(0), K = tables.size(1), d = tables.size(2), NB = codes.size(0), V = codes.size(1), N = NB * 16, RG = row_groups;
  TORCH_CHECK(K == (nibbles ? 16 : K) && K <= 256, "the tables hold ", K, " codewords, the codes' layout ", nibbles ? 16 : 256, " at most");
  TORCH_CHECK(RG >= 1 && G % RG == 0 && NB % RG == 0 && V % (G / RG) == 0, "row_groups=", RG, " does not fit ", G, " tables, ", NB,
              " blocks of 16 rows and ", V, " vectors per row");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == N, "scale must be float32 [N]");
  const int64_t GC = G / RG, per_g = V / GC, per_r = NB / RG;
  at::Tensor w = at::empty({N, V * d}, tables.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* tp = tables.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  const int64_t cw = codes.size(2);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t nb = n / 16, j = n % 16, r = nb / per_r;
      const int64_t byte = nibbles ? (j & 7) : j, shift = nibbles && j >= 8 ? 4 : 0, mask = nibbles ? 0xF : 0xFF;
      const float s = sp[n];
      float* row = wp + n * V * d;
      const uint8_t* c = cp + nb * V * cw + byte;
      for (int64_t g = 0; g < GC; ++g) {
        const float* tg = tp + (r * GC + g) * K * d;
        for (int64_t v = g * per_g; v < (g + 1) * per_g; ++v) {
          const int64_t code = std::min<int64_t>((c[v * cw] >> shift) & mask, K - 1);
          const float* t = tg + code * d;
          float* o = row + v * d;
          if (d == 2) {
            o[0] = s * t[0], o[1] = s * t[1];
          } else if (d == 4) {
            o[0] = s * t[0], o[1] = s * t[1], o[2] = s * t[2], o[3] = s * t[3];
          } else {
            for (int64_t q = 0; q < d; ++q) o[q] = s * t[q];
          }
        }
      }
    }
  });
  return w;
}

// As vq8_mm for vectors of 4k coordinates, AVX-512 only, through the quarter loads
// (vq_quad_rows512) at every batch size: codes uint8 [N / 16, V, 16] ("vq8-r16"); tables float32
// [G, K, d] (not transposed: each codeword's coordinates contiguous), K <= 256.
at::Tensor vq_quad_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups) {
  const VQCall c = vq_check(x, codes, tables, scale, row_groups, 1, 16, true);
  TORCH_CHECK(c.d % 4 == 0 && c.K <= 256, "vq_quad_mm takes vectors of 4k coordinates and at most 256 codewords, not d=", c.d, ", ", c.K);
  return vq_direct(c, x, codes, tables, scale, kQuad);
}
