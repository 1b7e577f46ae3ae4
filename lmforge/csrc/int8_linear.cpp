// lmforge_kernels::int8_linear: y = x W^T for int8 weights, with AVX-512 VNNI.
//
// x (..., K) float32; W = q * scale, q int8 (N, K) with one fp32 scale per output row, held in
// the layout below (`kernels.int8_pack` in lmforge/kernels.py makes it; `kernels.int8_reference`
// is this op written in torch, the spec the tests hold it to). Returns (..., N) float32.
//
// The arithmetic is llama.cpp's Q8_0 dot product (what its int8 decode computes): each row of x
// is quantised to 8 bits per block of 32 values (scale = max |x| / 127 over the block, round to
// nearest even), each block's integer dot product with the 8-bit weights is exact in int32, and
// y = scale_w[n] * sum over blocks of scale_x[block] * dot. Per block, not per row: SmolLM2's
// activations carry outliers that one scale per row spreads over all 576 values (SmolLM2-135M,
// mean |d log p| against fp32 over 32 decoding steps: 0.14 here, 0.33 through fbgemm with its
// 7-bit weights and one scale per row; benchmarks/int8_quality.py, docs/inference.md).
//
// Why a kernel: on an AVX-512 VNNI CPU one `vpdpbusd` multiplies 64 u8 x s8 pairs and adds them
// into 16 int32 sums; fbgemm's kernels (written for AVX2's 16-bit pair sums) neither use it nor
// keep the 8th weight bit. Measured on a Zen 5 core at 16 rows (serve's batched decode step),
// every SmolLM2-135M product of a forward in turn, weights from memory: 11.8 ms against fbgemm's
// 17.2; at 64 rows (a prompt) 37.3 against 40.7 (benchmarks/linear_forms.py --int8-kernel).
//
// Layout. Weights: [N/16][K/4][16][4] int8: one 64-byte vector holds 4 consecutive k of 16
// consecutive output rows, `vpdpbusd`'s operand as it is; the blocks of one group of 16 outputs
// are contiguous, so a product streams the weights once, front to back (prefetched 8 KB ahead:
// without it the loop waited on memory, 27.4 against 11.2 ms). x is quantised to u8 = q + 128
// (`vpdpbusd` multiplies unsigned by signed), so each block's dot product carries 128 * sum(w)
// too: `wsum` [N/16][K/32][16] int32 holds -128 * sum(w) per block, the start of each sum.
//
// Tiles: 16 output columns x up to 16 rows of x, the block's 8 weight vectors in registers,
// one int32 sum per row per block and one fp32 sum per row. Rows come in chunks of 128 so that
// their quantised values stay in cache while every weight passes; at::parallel_for splits the
// output columns. Built only where the compiler targets AVX-512 VNNI (-march=native on such a
// CPU); elsewhere the op is not defined and lmforge uses fbgemm (lmforge/quant.py).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lmforge_int8 {

constexpr int64_t BLOCK = 32;     // activation values per scale (Q8_0's block)
constexpr int64_t COLS = 16;      // output columns per tile: one vector of int32 sums
constexpr int ROWS = 16;          // rows of x per tile
constexpr int64_t CHUNK = 128;    // rows of x quantised and multiplied together
constexpr int64_t PREFETCH = 8192;  // bytes ahead in the weight stream

// x rows (M, K) (row stride ldx) -> xu (M, K) u8 = round(x * 127 / amax) + 128 per block, sx (M, K/32)
// = amax / 127. A block holding NaN or inf gets scale NaN, so its row's outputs are NaN as the
// float product's would be (not a finite number made of saturated integers).
void quantize(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* xu, float* sx) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m128i offset = _mm_set1_epi8(static_cast<char>(0x80));
  const int64_t G = K / BLOCK;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * ldx;
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_loadu_ps(row + g * BLOCK), b = _mm512_loadu_ps(row + g * BLOCK + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
      // max_ps returns its second operand when either is NaN: check the block itself
      bool finite = _mm512_cmp_ps_mask(_mm512_add_ps(a, b), _mm512_add_ps(a, b), _CMP_ORD_Q) == 0xffff
                    && std::isfinite(amax);
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      if (!std::isfinite(inv)) inv = 0.f;  // amax below ~4e-37: 127 / amax overflows; the block is zeros then
      sx[m * G + g] = finite ? amax / 127.f : NAN;
      __m512 vinv = _mm512_set1_ps(finite ? inv : 0.f);
      __m128i qa = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, vinv)));  // round to nearest even
      __m128i qb = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, vinv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + m * K + g * BLOCK), _mm_xor_si128(qa, offset));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + m * K + g * BLOCK + 16), _mm_xor_si128(qb, offset));
    }
  }
}

// MT rows of x (quantised: xu, sx) times one group of 16 output columns (w, wsum, scale) -> y.
template <int MT>
inline void tile(const uint8_t* xu, const float* sx, int64_t K, const int8_t* w, const int32_t* wsum,
                 const float* scale, float* y, int64_t ldy) {
  const int64_t G = K / BLOCK;
  __m512 out[MT];
  for (int m = 0; m < MT; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* wg = w + g * BLOCK * COLS;  // 8 vectors: k = 32g .. 32g+31 of the 16 columns
    for (int i = 0; i < 8; ++i) _mm_prefetch(reinterpret_cast<const char*>(wg + PREFETCH + 64 * i), _MM_HINT_T0);
    __m512i wv[8];
    for (int i = 0; i < 8; ++i) wv[i] = _mm512_loadu_si512(wg + 64 * i);
    const __m512i start = _mm512_loadu_si512(wsum + g * COLS);  // -128 * sum(w) over the block
    for (int m = 0; m < MT; ++m) {
      const uint8_t* xb = xu + m * K + g * BLOCK;
      __m512i acc = start;
      for (int i = 0; i < 8; ++i) {
        int32_t four;
        std::memcpy(&four, xb + 4 * i, 4);
        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(four), wv[i]);
      }
      out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sx[m * G + g]), out[m]);
    }
  }
  const __m512 s = _mm512_loadu_ps(scale);
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(out[m], s));
}

// rows [0, M) of the chunk times column group c
void column(const uint8_t* xu, const float* sx, int64_t M, int64_t K, const int8_t* w, const int32_t* wsum,
            const float* scale, float* y, int64_t N, int64_t c) {
  const int64_t G = K / BLOCK;
  const int8_t* wc = w + c * COLS * K;
  const int32_t* sc = wsum + c * COLS * G;
  const float* s = scale + c * COLS;
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) tile<ROWS>(xu + m * K, sx + m * G, K, wc, sc, s, y + m * N + c * COLS, N);
  const uint8_t* xr = xu + m * K;
  const float* sr = sx + m * G;
  float* yr = y + m * N + c * COLS;
  switch (M - m) {  // the last rows: a tile of their count, unrolled as the full ones
#define LMFORGE_TILE(n) case n: tile<n>(xr, sr, K, wc, sc, s, yr, N); break;
    LMFORGE_TILE(1) LMFORGE_TILE(2) LMFORGE_TILE(3) LMFORGE_TILE(4) LMFORGE_TILE(5) LMFORGE_TILE(6) LMFORGE_TILE(7)
    LMFORGE_TILE(8) LMFORGE_TILE(9) LMFORGE_TILE(10) LMFORGE_TILE(11) LMFORGE_TILE(12) LMFORGE_TILE(13)
    LMFORGE_TILE(14) LMFORGE_TILE(15)
#undef LMFORGE_TILE
    default: break;
  }
}

at::Tensor int8_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& scale) {
  TORCH_CHECK(x_.dim() >= 1 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "int8_linear: x must be float32 on the CPU, got ", x_.scalar_type(), " on ", x_.device());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == COLS && w.size(3) == 4 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_linear: w must be contiguous int8 (N/16, K/4, 16, 4) (kernels.int8_pack), got ", w.sizes());
  const int64_t K = x_.size(-1), N = w.size(0) * COLS;
  TORCH_CHECK(K > 0 && K % BLOCK == 0 && w.size(1) * 4 == K,
              "int8_linear: x's last dimension ", K, " must be a multiple of 32 and match w's ", w.size(1) * 4);
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() && wsum.dim() == 3 && wsum.size(0) == N / COLS
              && wsum.size(1) == K / BLOCK && wsum.size(2) == COLS, "int8_linear: wsum must be contiguous int32 (N/16, K/32, 16)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8_linear: scale must be ", N, " contiguous float32 values");
  at::Tensor x = x_.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(shape);
  const int64_t rows = std::min(M, CHUNK), G = K / BLOCK;
  std::vector<uint8_t> xu(rows * K);
  std::vector<float> sx(rows * G);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* sp = wsum.data_ptr<int32_t>();
  const float* scp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
    const int64_t mc = std::min(CHUNK, M - m0);
    quantize(xp + m0 * K, mc, K, K, xu.data(), sx.data());
    at::parallel_for(0, N / COLS, 1, [&](int64_t a, int64_t b) {
      for (int64_t c = a; c < b; ++c) column(xu.data(), sx.data(), mc, K, wp, sp, scp, yp + m0 * N, N, c);
    });
  }
  return y.view(shape);
}

}  // namespace lmforge_int8

TORCH_LIBRARY_FRAGMENT(lmforge_kernels, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor wsum, Tensor scale) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(lmforge_int8::int8_linear));
}

#endif
