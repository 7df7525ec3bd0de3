// Branch-free float versions of exp / log1p / tanh / sigmoid for the element loops of the CPU
// kernels. std::exp, std::log1p and std::tanh are scalar library calls: a loop calling them does not
// vectorise and they cost ~10x the rest of a fused element-wise op (measured: a fused tanh epilogue
// ran at ~14 ns per element, twice torch's). These inline to a few FMAs per element, vectorise under
// -O3 -fno-math-errno, and are accurate to a few float ulps; double keeps the library functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastgan {

// exp(y) for y <= 0: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp). Values
// below -104 flush to 0 (exp rounds to 0 there); between -104 and -87 the result is subnormal, as
// torch's exp and sigmoid give it (a flush at -87 made sigmoid(-88) 0, and its gradient times an
// infinite incoming gradient NaN where torch's is inf): 2^n is applied as 2^(n + 64) (a normal float for
// every n here) and then 2^-64, which rounds once and only where the result is subnormal. NaN
// propagates. The rounding of y / ln 2 to an integer uses the 1.5 * 2^23 trick rather than std::floor,
// which is a library call below SSE4.1.
inline float exp_nonpositive(float y) {
  const float yc = y < -104.0f ? -104.0f : y;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (yc * 1.44269504088896341f + kRound) - kRound;
  float r = yc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127 + 64) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y < -104.0f ? 0.0f : (p * scale) * 5.42101086242752217e-20f;  // 2^-64
}
inline double exp_nonpositive(double y) { return std::exp(y); }

// log1p(e) for e in [0, 1]: 2 atanh(e / (2 + e)) as an odd series in s = e / (2 + e) <= 1/3,
// truncated after s^15 (relative error < 2e-9).
inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float t = 1.0f / 15.0f;
  t = t * s2 + 1.0f / 13.0f;
  t = t * s2 + 1.0f / 11.0f;
  t = t * s2 + 1.0f / 9.0f;
  t = t * s2 + 1.0f / 7.0f;
  t = t * s2 + 1.0f / 5.0f;
  t = t * s2 + 1.0f / 3.0f;
  t = t * s2 + 1.0f;
  return 2.0f * s * t;
}
inline double log1p_unit(double e) { return std::log1p(e); }

// tanh: Cephes' tanhf. |x| < 0.625: x + x^3 P(x^2) (no cancellation near 0); otherwise
// (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29, sign restored. +-inf -> +-1, NaN -> NaN.
inline float tanh_float(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_nonpositive(-2.0f * ax);
  const float large = std::copysign((1.0f - e) / (1.0f + e), x);
  return ax < 0.625f ? small : large;
}
inline double tanh_float(double x) { return std::tanh(x); }

// sigmoid from exp(-|x|), which never overflows; both branches are accurate. Below -ln(max) it is 0,
// as torch's 1 / (1 + exp(-x)) gives it once exp(-x) overflows (exp(x) would still be subnormal there):
// the reference's output and gradient are then exactly 0 (an infinite incoming gradient: NaN, not inf).
template <typename T> inline T sigmoid_stable(T x) {
  constexpr T kZeroBelow = std::is_same_v<T, double> ? T(-709.782712893384) : T(-88.72283172607422);
  const T e = exp_nonpositive(-std::abs(x));
  const T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : (x < kZeroBelow ? T(0) : e * inv);
}

}  // namespace fastgan
