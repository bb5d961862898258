// Lane abstractions for the CPU pair-loss kernels (contrastive.cpp, sigmoid.cpp): one loop body,
// written once as a generic lambda, runs on 8-wide AVX2 float registers for the bulk of a row and
// on plain scalars for the tail (and for double, where speed does not matter: float64 is the
// testing dtype).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CALRFT_HAVE_AVX2 1
// std::array<__m256, K> drops __m256's may_alias attribute; harmless for plain register arrays.
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace calrft::cpu {

// One scalar lane; the reference semantics every vector lane type must match.
template <typename T>
struct ScalarLanes {
  using reg = T;
  using mask = bool;
  static constexpr int width = 1;
  static reg load(const T* p) { return *p; }
  static void store(T* p, reg v) { *p = v; }
  static reg set1(T v) { return v; }
  static reg zero() { return T(0); }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  // A max may drop a NaN; that is fine because the exp sums that follow see every element and
  // exp keeps NaN, so a NaN logit still yields a NaN statistic.
  static reg max(reg a, reg b) { return a > b ? a : b; }
  static reg exp(reg x) { return std::exp(x); }
  static reg div(reg a, reg b) { return a / b; }
  static reg abs(reg a) { return std::fabs(a); }
  static reg neg(reg a) { return -a; }
  static reg log(reg x) { return std::log(x); }
  static mask ge(reg a, reg b) { return a >= b; }
  static mask eq(reg a, reg b) { return a == b; }
  static reg select(mask m, reg a, reg b) { return m ? a : b; }  // m ? a : b
  static T hsum(reg v) { return v; }
  static T hmax(reg v) { return v; }
};

#ifdef CALRFT_HAVE_AVX2
// exp on 8 floats: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-6 minimax
// polynomial (the Cephes expf coefficients), 2^n assembled in the exponent bits.
// Max error measured against double exp: see tests/test_contrastive_cpu_kernel.py.
inline __m256 exp_avx2(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365447504f);  // ln(FLT_MIN): keeps 2^n a normal number
  // max(lo, x) / min(hi, x) return x when x is NaN (the second operand wins), so NaN survives.
  __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // Below ln(FLT_MIN) the true value is (sub)normal or 0: return exactly 0 (exp(-inf) = 0).
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, y);
}

// log on 8 positive floats: x = 2^e m with m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial in
// m - 1 (the Cephes logf coefficients), e ln2 added in two parts. Normal positive inputs only (the
// callers pass values in [1, 2]); NaN propagates. Error against double log: the tests measure it.
inline __m256 log_avx2(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  // mantissa in [0.5, 1)
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  __m256 r = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));  // m - 1 or 2m - 1
  __m256 z = _mm256_mul_ps(r, r);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, r), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  __m256 out = _mm256_add_ps(r, y);
  out = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), out);
  // NaN in, NaN out (the bit manipulation above would turn it into a finite number).
  return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

struct Avx2Floats {
  using reg = __m256;
  using mask = __m256;
  static constexpr int width = 8;
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg exp(reg x) { return exp_avx2(x); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static reg neg(reg a) { return _mm256_xor_ps(_mm256_set1_ps(-0.0f), a); }
  static reg log(reg x) { return log_avx2(x); }
  static mask ge(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static mask eq(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(reg v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    float m = lanes[0];
    for (int i = 1; i < 8; ++i) m = ScalarLanes<float>::max(m, lanes[i]);
    return m;
  }
};
#endif

// The widest lane type for T (scalar when no vector type exists).
template <typename T>
struct WideLanes { using type = ScalarLanes<T>; };
#ifdef CALRFT_HAVE_AVX2
template <>
struct WideLanes<float> { using type = Avx2Floats; };
#endif

// Runs body(lanes, j) over j in [0, n): full vectors first, then the scalar tail. The body
// returns an std::array of K registers to be summed along the row; the K row sums come back.
// Summing into one register per statistic (instead of a horizontal sum per vector) keeps the
// row reductions as cheap as the column ones.
template <typename T, int K, typename Body>
inline std::array<T, K> row_sums(int64_t n, Body&& body) {
  using V = typename WideLanes<T>::type;
  using S = ScalarLanes<T>;
  std::array<T, K> total{};
  int64_t j = 0;
  if constexpr (V::width > 1) {
    std::array<typename V::reg, K> acc;
    for (auto& a : acc) a = V::zero();
    for (; j + V::width <= n; j += V::width) {
      auto v = body(V{}, j);
      for (int c = 0; c < K; ++c) acc[c] = V::add(acc[c], v[c]);
    }
    for (int c = 0; c < K; ++c) total[c] = V::hsum(acc[c]);
  }
  for (; j < n; ++j) {
    auto v = body(S{}, j);
    for (int c = 0; c < K; ++c) total[c] += v[c];
  }
  return total;
}

// e = exp(-|x|) and log(1 + e), accurate to a few ulps for every x: log(1 + e) is evaluated as
// log(v) * e / (v - 1) with v = 1 + e (exact: v - 1 is the e that v holds), and as e itself where
// e is below v's resolution. The building block of softplus(x) = max(x, 0) + log(1 + exp(-|x|)).
template <typename L>
inline void exp_log1p_neg_abs(typename L::reg x, typename L::reg& e, typename L::reg& l1p) {
  e = L::exp(L::neg(L::abs(x)));
  const auto v = L::add(L::set1(1), e);
  const auto held = L::sub(v, L::set1(1));
  l1p = L::select(L::eq(held, L::zero()), e, L::mul(L::log(v), L::div(e, held)));
}

// Runs body(lanes, j) over j in [0, n) for its side effects (vector part, then scalar tail).
template <typename T, typename Body>
inline void for_lanes(int64_t n, Body&& body) {
  using V = typename WideLanes<T>::type;
  int64_t j = 0;
  if constexpr (V::width > 1)
    for (; j + V::width <= n; j += V::width) body(V{}, j);
  for (; j < n; ++j) body(ScalarLanes<T>{}, j);
}

}  // namespace calrft::cpu
