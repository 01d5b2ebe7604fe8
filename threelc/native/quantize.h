// The quantization kernels shared by encode.cpp (base-3^5 bytes) and lanes.cpp (lane
// words): per-segment absmax, and one pass that compensates, quantizes by the exact
// rounding thresholds and writes the new residual and the digits.
#pragma once

#include "codec.h"

namespace threelc {
namespace kernels {

inline uint32_t abs_bits(float c) {
  uint32_t bits;
  std::memcpy(&bits, &c, 4);
  return bits & 0x7FFFFFFFu;
}

// Largest |x + r| and largest |x| over n elements, as the bits of non-negative floats:
// bit patterns of non-negative floats order like the floats, and every NaN sorts above
// +inf. Both maxima come from the one read of x (|x| only when Bounded asks for it).
struct AbsmaxBits {
  uint32_t compensated = 0, gradient = 0;
};

template <class L, bool HasResidual, bool Bounded>
AbsmaxBits absmax_bits(const typename L::T* x, const float* r, int64_t n) {
  uint32_t m = 0, g = 0;
  for (int64_t j = 0; j < n; ++j) {
    float v = L::load(x[j]), c = v;
    if (HasResidual) c = c + r[j];
    uint32_t a = abs_bits(c);
    m = a > m ? a : m;
    if (Bounded) {
      uint32_t b = abs_bits(v);
      g = b > g ? b : g;
    }
  }
  return {m, Bounded ? g : m};
}

template <class L>
AbsmaxBits absmax_any(const void* x, const float* r, int64_t offset, int64_t n, bool bounded) {
  const auto* xs = static_cast<const typename L::T*>(x) + offset;
  if (!r) return absmax_bits<L, false, false>(xs, nullptr, n);  // no residual: max|x + r| is max|x|
  return bounded ? absmax_bits<L, true, true>(xs, r + offset, n) : absmax_bits<L, true, false>(xs, r + offset, n);
}

inline AbsmaxBits absmax_dispatch(const void* x, int dtype, const float* r, int64_t offset, int64_t n, bool bounded) {
  if (dtype == kFloat32) return absmax_any<LoadF32>(x, r, offset, n, bounded);
  if (dtype == kBFloat16) return absmax_any<LoadBF16>(x, r, offset, n, bounded);
  return absmax_any<LoadF16>(x, r, offset, n, bounded);
}

// quantize.bounded_absmax on bits: the smaller where both are finite, else the larger,
// so a NaN or inf in x or r still makes the scale non-finite.
inline uint32_t bounded_bits(AbsmaxBits m) {
  constexpr uint32_t kInfBits = 0x7F800000u;
  if (m.compensated < kInfBits && m.gradient < kInfBits) return std::min(m.compensated, m.gradient);
  return std::max(m.compensated, m.gradient);
}

// The quantization of one run of elements that share a segment. Digits go into acc:
// base-3^5 bytes as acc = acc * 3 + (q + 1) (a Horner step), lane words as
// acc += (q + 1) << shift. The residual goes to r_out.
template <class L, bool HasResidual, bool Feedback, class Acc>
int64_t quantize_span(const typename L::T* __restrict__ x, const float* __restrict__ r, float* __restrict__ r_out,
                      int64_t n, float t, float scale, Acc* __restrict__ acc, int shift) {
  int64_t zeros = 0;  // lane words only: base-3^5 bytes count their zeros from the bytes
  const float minus_t = -t;
  for (int64_t j = 0; j < n; ++j) {
    float c = L::load(x[j]);
    if (HasResidual) c = c + r[j];
    int q = static_cast<int>(c >= t) - static_cast<int>(c <= minus_t);
    if (Feedback) r_out[j] = c - static_cast<float>(q) * scale;
    if constexpr (sizeof(Acc) == 1) {
      acc[j] = static_cast<Acc>(acc[j] * 3 + (q + 1));
    } else {
      acc[j] += static_cast<Acc>(q + 1) << shift;
      zeros += (q == 0);
    }
  }
  return zeros;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// The steady-state training case (float32 gradient, a residual, error feedback on) by
// hand: the same IEEE operations as quantize_span, with the new residual written by
// streaming stores, since it is not read again this step and a cached store would
// first read its line from memory.
template <>
inline int64_t quantize_span<LoadF32, true, true, uint8_t>(const float* __restrict__ x, const float* __restrict__ r,
                                                   float* __restrict__ r_out, int64_t n, float t, float scale,
                                                   uint8_t* __restrict__ acc, int) {
  const float minus_t = -t;
  int64_t j = 0;
  auto scalar = [&](int64_t end) {
    for (; j < end; ++j) {
      float c = x[j] + r[j];
      int q = static_cast<int>(c >= t) - static_cast<int>(c <= minus_t);
      r_out[j] = c - static_cast<float>(q) * scale;
      acc[j] = static_cast<uint8_t>(acc[j] * 3 + (q + 1));
    }
  };
  int64_t head = ((64 - (reinterpret_cast<uintptr_t>(r_out) & 63)) & 63) / 4;
  if ((reinterpret_cast<uintptr_t>(r_out) & 3) != 0) head = n;  // not float-aligned: no streaming
  scalar(std::min(n, head));
  const __m512 tv = _mm512_set1_ps(t), mtv = _mm512_set1_ps(minus_t), sv = _mm512_set1_ps(scale);
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f), zero = _mm512_setzero_ps();
  const __m128i d0 = _mm_set1_epi8(0), d1 = _mm_set1_epi8(1), d2 = _mm_set1_epi8(2);
  for (; j + 16 <= n; j += 16) {
    __m512 c = _mm512_add_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(r + j));
    __mmask16 ge = _mm512_cmp_ps_mask(c, tv, _CMP_GE_OQ), le = _mm512_cmp_ps_mask(c, mtv, _CMP_LE_OQ);
    __m512 q = _mm512_mask_blend_ps(ge, _mm512_mask_blend_ps(le, zero, minus_one), one);
    _mm512_stream_ps(r_out + j, _mm512_sub_ps(c, _mm512_mul_ps(q, sv)));
    __m128i digit = _mm_mask_blend_epi8(ge, _mm_mask_blend_epi8(le, d1, d0), d2);
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + j));
    a = _mm_add_epi8(_mm_add_epi8(a, _mm_add_epi8(a, a)), digit);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + j), a);
  }
  scalar(n);
  return 0;
}
#endif

template <class Acc>
using SpanFn = int64_t (*)(const void*, const float*, float*, int64_t, float, float, Acc*, int);

template <class L, bool HasResidual, bool Feedback, class Acc>
int64_t span_entry(const void* x, const float* r, float* r_out, int64_t n, float t, float scale, Acc* acc, int shift) {
  return quantize_span<L, HasResidual, Feedback, Acc>(static_cast<const typename L::T*>(x), r, r_out, n, t, scale,
                                                      acc, shift);
}

template <class L, class Acc>
SpanFn<Acc> pick_span(bool has_residual, bool feedback) {
  if (has_residual) return feedback ? span_entry<L, true, true, Acc> : span_entry<L, true, false, Acc>;
  return feedback ? span_entry<L, false, true, Acc> : span_entry<L, false, false, Acc>;
}

template <class Acc>
SpanFn<Acc> pick_span(int dtype, bool has_residual, bool feedback) {
  if (dtype == kFloat32) return pick_span<LoadF32, Acc>(has_residual, feedback);
  if (dtype == kBFloat16) return pick_span<LoadBF16, Acc>(has_residual, feedback);
  return pick_span<LoadF16, Acc>(has_residual, feedback);
}

inline int element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Quantizes `streams` interleaved streams of `width` elements each (stream k holds
// payload elements [k * width, (k + 1) * width), the tail past numel being padding)
// into one accumulator per position: the base-3^5 bytes (5 streams) or the lane words.
template <class Acc>
struct StreamPacker {
  const void* x;
  const float* residual;
  float* residual_out;
  const Segments& seg;
  const float* thresholds;
  const float* scales;
  SpanFn<Acc> span;
  int64_t width;
  int esize, streams, shift_step;
  std::vector<SegmentCursor> cursor;

  StreamPacker(const void* x_, int dtype, const float* r, float* r_out, const Segments& s, const float* t,
               const float* sc, int64_t width_, int streams_, int shift_step_)
      : x(x_), residual(r), residual_out(r_out), seg(s), thresholds(t), scales(sc), width(width_),
        esize(element_size(dtype)), streams(streams_), shift_step(shift_step_), cursor(streams_) {
    span = pick_span<Acc>(dtype, r != nullptr, r_out != nullptr);
    for (auto& c : cursor) c.table = &seg;
  }

  // Positions [j0, j1) into acc (zeroed here); returns the ternary zeros among them.
  int64_t pack(int64_t j0, int64_t j1, Acc* acc) {
    std::memset(acc, 0, (j1 - j0) * sizeof(Acc));
    int64_t zeros = 0;
    const char* xb = static_cast<const char*>(x);
    for (int k = 0; k < streams; ++k) {
      const int shift = shift_step * k;
      int64_t i = k * width + j0, end = k * width + j1, real_end = std::min(end, seg.numel);
      SegmentCursor& c = cursor[k];
      while (i < real_end) {
        c.seek(i);
        int64_t s = c.seg, stop = std::min(real_end, seg.start[s + 1]);
        int64_t at = seg.offset[s] + (i - seg.start[s]);
        zeros += span(xb + at * esize, residual ? residual + at : nullptr, residual_out ? residual_out + at : nullptr,
                      stop - i, thresholds[s], scales[s], acc + (i - k * width - j0), shift);
        i = stop;
      }
      for (int64_t p = std::max(i, k * width + j0); p < end; ++p) {  // padding: t = 1
        Acc& a = acc[p - k * width - j0];
        if constexpr (sizeof(Acc) == 1) a = static_cast<Acc>(a * 3 + 1);
        else a += static_cast<Acc>(1) << shift;
      }
    }
    return zeros;
  }
};

inline std::vector<float> thresholds_of(const float* scales, int64_t count) {
  std::vector<float> t(count);
  for (int64_t s = 0; s < count; ++s) t[s] = round_threshold(scales[s]);
  return t;
}
}  // namespace kernels
}  // namespace threelc
