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
// Elsewhere a scalar loop over the same layout. Float32 throughout: the outputs equal the
// dequantized weight's product up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

template <int MB>
__attribute__((target("avx512f"))) void vq16_block512(const float* P, int64_t ldp, const uint8_t* codes, const float* scale, float* y,
                                                      int64_t ldy, int64_t nb, int64_t V) {
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  __m512 a[MB], b[MB];
  for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm512_setzero_ps();
  const uint8_t* c = codes + nb * V * 8;
  int64_t v = 0;
  for (; v + 2 <= V; v += 2) {
    const __m128i c0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8));
    const __m128i c1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8 + 8));
    const __m512i i0 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c0, c0)), shifts);
    const __m512i i1 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c1, c1)), shifts);
    for (int m = 0; m < MB; ++m) {
      a[m] = _mm512_add_ps(a[m], _mm512_permutexvar_ps(i0, _mm512_loadu_ps(P + m * ldp + v * 16)));
      b[m] = _mm512_add_ps(b[m], _mm512_permutexvar_ps(i1, _mm512_loadu_ps(P + m * ldp + v * 16 + 16)));
    }
  }
  if (v < V) {
    const __m128i c0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + v * 8));
    const __m512i i0 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(c0, c0)), shifts);
    for (int m = 0; m < MB; ++m) a[m] = _mm512_add_ps(a[m], _mm512_permutexvar_ps(i0, _mm512_loadu_ps(P + m * ldp + v * 16)));
  }
  const __m512 s = _mm512_loadu_ps(scale + nb * 16);
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * ldy + nb * 16, _mm512_mul_ps(_mm512_add_ps(a[m], b[m]), s));
}

__attribute__((target("avx512f"))) void vq16_rows512(const float* P, const uint8_t* codes, const float* scale, float* y, int64_t M,
                                                     int64_t N, int64_t V, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) vq16_block512<4>(P + m * V * 16, V * 16, codes, scale, y + m * N, N, nb, V);
    switch (M - m) {
      case 3: vq16_block512<3>(P + m * V * 16, V * 16, codes, scale, y + m * N, N, nb, V); break;
      case 2: vq16_block512<2>(P + m * V * 16, V * 16, codes, scale, y + m * N, N, nb, V); break;
      case 1: vq16_block512<1>(P + m * V * 16, V * 16, codes, scale, y + m * N, N, nb, V); break;
      default: break;
    }
  }
}

void vq16_rows(const float* P, const uint8_t* codes, const float* scale, float* y, int64_t M, int64_t N, int64_t V, int64_t nb0,
               int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb)
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 16; ++j) {
        float acc = 0.f;
        for (int64_t v = 0; v < V; ++v) {
          const uint8_t byte = codes[(nb * V + v) * 8 + (j & 7)];
          acc += P[(m * V + v) * 16 + (j < 8 ? byte & 0xF : byte >> 4)];
        }
        y[m * N + nb * 16 + j] = acc * scale[nb * 16 + j];
      }
}

// P [M, V, 16] from x [M, V d] and the tables transposed to Tt [G, d, 16] (V / G vectors per group).
__attribute__((target("avx512f"))) void vq16_tables512(const float* x, const float* Tt, float* P, int64_t M, int64_t V, int64_t d, int64_t G) {
  const int64_t per = V / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = 0; v < V; ++v) {
      const float* t = Tt + (v / per) * d * 16;
      const float* xv = x + m * V * d + v * d;
      __m512 acc = _mm512_mul_ps(_mm512_set1_ps(xv[0]), _mm512_loadu_ps(t));
      for (int64_t j = 1; j < d; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(xv[j]), _mm512_loadu_ps(t + j * 16), acc);
      _mm512_storeu_ps(P + (m * V + v) * 16, acc);
    }
}

void vq16_tables(const float* x, const float* Tt, float* P, int64_t M, int64_t V, int64_t d, int64_t G) {
  const int64_t per = V / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = 0; v < V; ++v)
      for (int k = 0; k < 16; ++k) {
        float acc = 0.f;
        for (int64_t j = 0; j < d; ++j) acc += x[m * V * d + v * d + j] * Tt[((v / per) * d + j) * 16 + k];
        P[(m * V + v) * 16 + k] = acc;
      }
}

}  // namespace

bool vq16_avx512() { return __builtin_cpu_supports("avx512f"); }

// x: float32 [M, K]; codes: uint8 [N / 16, V, 8] ("vq16-r16", V = K / d); tables: float32
// [G, d, 16] (the codewords transposed: entry k of coordinate t at [g, t, k]; G = row_groups
// blocks of N / row_groups rows times the column groups, row-group major); scale: float32 [N];
// avx512: -1 where the CPU has it, 0 the scalar loops, 1 AVX-512 (refused where the CPU lacks
// it). Returns y float32 [M, N].
at::Tensor vq16_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scale, int64_t row_groups,
                   int64_t avx512) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == 8,
              "codes must be contiguous uint8 [N/16, V, 8]");
  TORCH_CHECK(tables.dim() == 3 && tables.scalar_type() == at::kFloat && tables.is_contiguous() && tables.size(2) == 16,
              "tables must be contiguous float32 [G, d, 16]");
  const int64_t G = tables.size(0), d = tables.size(1), V = codes.size(1), NB = codes.size(0), N = NB * 16, RG = row_groups;
  TORCH_CHECK(RG >= 1 && G % RG == 0 && NB % RG == 0, "row_groups=", RG, " must divide the ", G, " tables and the ", NB, " blocks of 16 rows");
  const int64_t GC = G / RG;
  TORCH_CHECK(d >= 1 && GC >= 1 && V % GC == 0, "the ", V, " vectors per row do not split into ", GC, " groups");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == V * d,
              "x must be a contiguous float32 [M, ", V * d, "] tensor");
  const int64_t M = x.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == N, "scale must be float32 [N]");
  TORCH_CHECK(avx512 == -1 || avx512 == 0 || (avx512 == 1 && vq16_avx512()), "avx512=1 needs a CPU with AVX-512");
  const bool wide = avx512 == 1 || (avx512 == -1 && vq16_avx512());
  at::Tensor P = at::empty({RG, M, V, 16}, x.options());  // per block of rows: its own tables
  for (int64_t r = 0; r < RG; ++r) {
    const float* tr = tables.data_ptr<float>() + r * GC * d * 16;
    float* pr = P.data_ptr<float>() + r * M * V * 16;
    if (wide)
      vq16_tables512(x.data_ptr<float>(), tr, pr, M, V, d, GC);
    else
      vq16_tables(x.data_ptr<float>(), tr, pr, M, V, d, GC);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* pp = P.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = NB / RG;  // blocks of 16 rows per row group
  at::parallel_for(0, NB, std::max<int64_t>(1, (NB + 4 * t - 1) / (4 * t)), [&](int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1;) {  // runs of blocks within one row group
      const int64_t r = nb / per, end = std::min(nb1, (r + 1) * per);
      if (wide)
        vq16_rows512(pp + r * M * V * 16, cp, sp, yp, M, N, V, nb, end);
      else
        vq16_rows(pp + r * M * V * 16, cp, sp, yp, M, N, V, nb, end);
      nb = end;
    }
  });
  return y;
}
