// lmforge_kernels::decode_attention: one decode step's attention for every row, fused.
//
// softmax(q k^T / sqrt(hd), masked) v for one query position per row: q (B, H, 1, hd), k and v
// (B, KV, L, hd) (strided views of a cache; rows of hd floats contiguous), mask (B, 1, L) bool
// (true: may attend; each row keeps at least one position). Returns (B, H, 1, hd), float32.
// `decode_attention` in lmforge/model.py is the reference it replaces for batched steps; the build
// and the fallback are lmforge/kernels.py's.
//
// Why: a serve step of 16 rows reads as many bytes of K/V cache as of int8 weights, and the
// batched-matmul path reads them slowly: B*KV matrix products of G x hd by hd x L, each too
// small for a BLAS call's blocking to pay back (SmolLM2-135M, 16 rows at L = 120, one core:
// 410 us a layer, a plain read of the same slices 40-130 us). Here one loop per (row, K/V head)
// reads each cached key and value row once for the G = H / KV query heads that share it, the
// softmax runs in registers-sized blocks, and the next (row, head)'s rows are prefetched while
// this one computes (without the prefetch the loop waited on memory: 240 against 90 us).
//
// Vectors are GCC/Clang vector extensions of 16 floats (GCC >= 9): the compiler lowers them to what the
// machine has (-march=native: one AVX-512 register, two AVX2 ones, four SSE ones), so one
// source serves every x86 and ARM CPU. exp is Cephes' polynomial (~1 ulp), vectorised.
// Summation order differs from the matmul path: results agree to float rounding (~1e-6).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
inline v16 splat(float x) { return v16{} + x; }

inline float hsum(v16 x) {
#if defined(__clang__) || __GNUC__ >= 12  // halves added as vectors: a few shuffles per dot product
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else  // GCC < 12 has no __builtin_shufflevector: the same tree, element by element
  float h[8];
  for (int j = 0; j < 8; ++j) h[j] = x[j] + x[j + 8];
  return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
#endif
}

inline float hmax(v16 x) {
  float m = x[0];
  for (int j = 1; j < 16; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// exp(x) for x <= 0 (scores minus their maximum): Cephes' polynomial on [-ln2/2, ln2/2] times
// 2^n built in the exponent bits. Below -87 it gives ~1e-38, not 0: callers zero what they mask.
inline v16 exp_le0(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16 t = x * 1.44269504088896341f + 0.5f;
  i16 n = __builtin_convertvector(t, i16);  // truncation toward zero ...
  n += __builtin_convertvector(n, v16) > t;  // ... made floor: -1 (true) where it rounded up
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v16 y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
           + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const i16 bits = (n + 127) << 23;
  v16 two;
  std::memcpy(&two, &bits, sizeof two);
  return y * two;
}

// One (row, K/V head): its G query rows Q (G, hd) against L cached keys and values (rows kt and
// vt floats apart), kept positions m; O (G, hd) = softmax(Q K^T * scale) V. hd % 16 == 0.
// s: scratch of G * Lp floats (Lp: L rounded up to 16). Kn, Vn: the next head's rows, prefetched.
template <int G>
void head(const float* Q, const float* K, int64_t kt, const float* V, int64_t vt, const bool* m, int64_t L,
          int64_t hd, float scale, float* s, float* O, const float* Kn, const float* Vn) {
  const int64_t Lp = (L + 15) / 16 * 16;
  for (int64_t t = 0; t < L; ++t) {  // scores: each key row read once for the G queries
    for (int64_t c = 0; c < hd; c += 16) {
      __builtin_prefetch(Kn + t * kt + c);
      __builtin_prefetch(Vn + t * vt + c);
    }
    if (!m[t]) {
      for (int g = 0; g < G; ++g) s[g * Lp + t] = -INFINITY;
      continue;
    }
    const float* kr = K + t * kt;
    v16 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = load(Q + g * hd) * load(kr);
    for (int64_t c = 16; c < hd; c += 16) {
      const v16 kv = load(kr + c);
      for (int g = 0; g < G; ++g) acc[g] += load(Q + g * hd + c) * kv;
    }
    for (int g = 0; g < G; ++g) s[g * Lp + t] = hsum(acc[g]) * scale;
  }
  for (int g = 0; g < G; ++g) {  // softmax of each query's scores, in place; masked ones weigh 0
    float* sg = s + g * Lp;
    for (int64_t t = L; t < Lp; ++t) sg[t] = -INFINITY;
    v16 mx = splat(-INFINITY);
    for (int64_t t = 0; t < Lp; t += 16) {
      const v16 x = load(sg + t);
      mx = x > mx ? x : mx;
    }
    const float top = hmax(mx);
    v16 sum = {};
    for (int64_t t = 0; t < Lp; t += 16) {
      const v16 x = load(sg + t);
      const v16 e = x == -INFINITY ? v16{} : exp_le0(x - top);
      store(sg + t, e);
      sum += e;
    }
    const float inv = 1.0f / hsum(sum);
    for (int64_t t = 0; t < Lp; t += 16) store(sg + t, load(sg + t) * inv);
  }
  for (int64_t c = 0; c < hd; c += 16) {  // values: a 16-wide column block at a time, G sums in registers
    v16 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = v16{};
    for (int64_t t = 0; t < L; ++t) {
      if (!m[t]) continue;
      const v16 vv = load(V + t * vt + c);
      for (int g = 0; g < G; ++g) acc[g] += s[g * Lp + t] * vv;
    }
    for (int g = 0; g < G; ++g) store(O + g * hd + c, acc[g]);
  }
}

typedef void (*Head)(const float*, const float*, int64_t, const float*, int64_t, const bool*, int64_t, int64_t, float,
                     float*, float*, const float*, const float*);
const Head HEADS[] = {nullptr, head<1>, head<2>, head<3>, head<4>, head<5>, head<6>, head<7>, head<8>};
constexpr int64_t MAX_GROUP = 8;

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_) {
  TORCH_CHECK(q_.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask_.dim() == 3,
              "decode_attention: q (B, H, 1, hd), k and v (B, KV, L, hd), mask (B, 1, L)");
  TORCH_CHECK(q_.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat
              && mask_.scalar_type() == at::kBool, "decode_attention: float32 q, k and v, a bool mask");
  TORCH_CHECK(q_.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask_.device().is_cpu(),
              "decode_attention: CPU tensors");
  const int64_t B = q_.size(0), H = q_.size(1), hd = q_.size(3), KV = k.size(1), L = k.size(2);
  TORCH_CHECK(q_.size(2) == 1 && KV > 0 && H >= KV && H % KV == 0 && H / KV <= MAX_GROUP && hd > 0 && hd % 16 == 0 && L > 0,
              "decode_attention: one query per row, at most 8 query heads per K/V head, head_dim a multiple of 16");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KV && v.size(2) == L && k.size(3) == hd
              && v.size(3) == hd && mask_.size(0) == B && mask_.size(1) == 1 && mask_.size(2) == L,
              "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v rows must be contiguous");
  const int64_t G = H / KV;
  const at::Tensor q = q_.contiguous(), mask = mask_.contiguous();
  at::Tensor out = at::empty({B, H, 1, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const Head fn = HEADS[G];
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * ((L + 15) / 16 * 16));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, h = i % KV;
      const int64_t n = i + 1 < end ? i + 1 : i, bn = n / KV, hn = n % KV;  // whose rows to prefetch
      fn(qp + (b * H + h * G) * hd, kp + b * kb + h * kh, kt, vp + b * vb + h * vh, vt, mp + b * L, L, hd, scale,
         s.data(), op + (b * H + h * G) * hd, kp + bn * kb + hn * kh, vp + bn * vb + hn * vh);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lmforge_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
