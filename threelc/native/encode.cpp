// Encode with error feedback: per-segment absmax, then one pass that compensates,
// quantizes by the exact rounding thresholds, writes the new residual and the
// base-3^5 bytes, with zero-run encoding streamed behind it.
#include "codec.h"

namespace threelc {

namespace {

struct HalfTable {
  float value[65536];
  HalfTable() {
    for (uint32_t h = 0; h < 65536; ++h) {
      uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
      if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);  // inf / NaN (payload kept)
      } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
      } else if (mantissa == 0) {
        bits = sign;
      } else {  // subnormal half: normalise
        int e = -1;
        do {
          ++e;
          mantissa <<= 1;
        } while ((mantissa & 0x400) == 0);
        bits = sign | ((112 - e) << 23) | ((mantissa & 0x3FF) << 13);
      }
      std::memcpy(&value[h], &bits, 4);
    }
  }
};
const HalfTable& half_table() {
  static const HalfTable table;
  return table;
}

inline uint32_t abs_bits(float c) {
  uint32_t bits;
  std::memcpy(&bits, &c, 4);
  return bits & 0x7FFFFFFFu;
}

// Largest |x + r| over n elements, as the bits of a non-negative float: bit patterns of
// non-negative floats order like the floats, and every NaN sorts above +inf.
template <class L, bool HasResidual>
uint32_t absmax_bits(const typename L::T* x, const float* r, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    float c = L::load(x[j]);
    if (HasResidual) c = c + r[j];
    uint32_t a = abs_bits(c);
    m = a > m ? a : m;
  }
  return m;
}

template <class L>
uint32_t absmax_any(const void* x, const float* r, int64_t offset, int64_t n) {
  const auto* xs = static_cast<const typename L::T*>(x) + offset;
  return r ? absmax_bits<L, true>(xs, r + offset, n) : absmax_bits<L, false>(xs, nullptr, n);
}

uint32_t absmax_dispatch(const void* x, int dtype, const float* r, int64_t offset, int64_t n) {
  if (dtype == kFloat32) return absmax_any<LoadF32>(x, r, offset, n);
  if (dtype == kBFloat16) return absmax_any<LoadBF16>(x, r, offset, n);
  return absmax_any<LoadF16>(x, r, offset, n);
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
int64_t quantize_span<LoadF32, true, true, uint8_t>(const float* __restrict__ x, const float* __restrict__ r,
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

int element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

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

std::vector<float> thresholds_of(const float* scales, int64_t count) {
  std::vector<float> t(count);
  for (int64_t s = 0; s < count; ++s) t[s] = round_threshold(scales[s]);
  return t;
}

inline void put_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }  // little-endian host
inline void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

}  // namespace

float half_to_float(uint16_t h) { return half_table().value[h]; }

const uint8_t* zero_digit_table() {  // how many of a packed byte's five digits are t = 1
  static const struct Table {
    uint8_t count[256];
    Table() {
      for (int b = 0; b < 256; ++b) {
        int v = b, zeros = 0;
        for (int k = 0; k < kTritsPerByte; ++k, v /= 3) zeros += (v % 3 == 1);
        count[b] = static_cast<uint8_t>(zeros);
      }
    }
  } table;
  return table.count;
}

int64_t count_zero_digits(const uint8_t* bytes, int64_t n) {
  const uint8_t* table = zero_digit_table();
  int64_t zeros = 0;
  for (int64_t i = 0; i < n; ++i) zeros += table[bytes[i]];
  return zeros;
}

namespace {
#if defined(__SSE2__)
// Bit i set where bytes[i] == 121, for 64 bytes.
inline uint64_t zero_group_mask(const uint8_t* bytes) {
  const __m128i zero_group = _mm_set1_epi8(static_cast<char>(kZeroGroup));
  uint64_t mask = 0;
  for (int q = 0; q < 4; ++q) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * q));
    mask |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero_group)))) << (16 * q);
  }
  return mask;
}
#endif
}  // namespace

void ZreWriter::literals(const uint8_t* bytes, int64_t n) {
  if (run) flush_run();
  const uint8_t* table = zero_digit_table();
  for (int64_t i = 0; i < n; ++i) literal_zero_digits += table[bytes[i]];
  std::memmove(out + pos, bytes, n);  // in place: out may trail bytes
  pos += n;
}

void ZreWriter::push(const uint8_t* bytes, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 64 <= n; i += 64) {
    uint64_t mask = zero_group_mask(bytes + i);
    if (mask == ~0ull) {
      run += 64, zero_groups += 64;
      continue;
    }
    int p = 0;
    while (p < 64) {
      uint64_t rest = mask >> p;
      if (rest & 1) {  // a stretch of zero groups
        int z = __builtin_ctzll(~rest);
        run += z, zero_groups += z, p += z;
      } else {
        int l = rest ? __builtin_ctzll(rest) : 64 - p;
        literals(bytes + i + p, l);
        p += l;
      }
    }
  }
#endif
  for (; i < n; ++i) {
    if (bytes[i] == kZeroGroup) {
      ++run, ++zero_groups;
    } else {
      literals(bytes + i, 1);
    }
  }
}

int64_t payload_capacity(int64_t segments, int64_t numel) {
  return kHeaderSize + kSegmentEntrySize * segments + packed_length(numel);
}

void segment_absmax(const void* x, int x_dtype, const float* residual, Segments& seg, float* out, int threads) {
  // Work items of at most kChunk elements, so one big segment still spreads over threads.
  constexpr int64_t kChunk = 1 << 16;
  struct Item { int64_t s, lo, n; };
  std::vector<Item> items;
  for (int64_t s = 0; s < seg.count; ++s)
    for (int64_t lo = 0; lo < seg.length[s]; lo += kChunk) items.push_back({s, lo, std::min(kChunk, seg.length[s] - lo)});
  std::vector<uint32_t> partial(items.size());
  int usable = seg.numel >= (int64_t(1) << 18) ? threads : 1;
  parallel_ranges(static_cast<int64_t>(items.size()), usable, [&](int64_t a, int64_t b, int) {
    for (int64_t w = a; w < b; ++w)
      partial[w] = absmax_dispatch(x, x_dtype, residual, seg.offset[items[w].s] + items[w].lo, items[w].n);
  });
  std::vector<uint32_t> best(seg.count, 0);
  for (size_t w = 0; w < items.size(); ++w) best[items[w].s] = std::max(best[items[w].s], partial[w]);
  for (int64_t s = 0; s < seg.count; ++s) {
    if (best[s] > 0x7F800000u) {
      out[s] = canonical_nan();
    } else {
      std::memcpy(&out[s], &best[s], 4);
    }
  }
}

using BytePacker = StreamPacker<uint8_t>;

BytePacker byte_packer(const EncodeArgs& a, const std::vector<float>& thresholds, int64_t n5) {
  return BytePacker(a.x, a.x_dtype, a.residual, a.residual_out, *a.segments, thresholds.data(), a.scales_out, n5,
                    kTritsPerByte, 0);
}

EncodeResult encode(const EncodeArgs& args) {
  Segments& seg = *args.segments;
  EncodeResult result;
  segment_absmax(args.x, args.x_dtype, args.residual, seg, args.scales_out, args.threads);
  for (int64_t s = 0; s < seg.count; ++s) {
    args.scales_out[s] = scale_from_absmax(args.scales_out[s], args.sparsity);
    if (!std::isfinite(args.scales_out[s])) result.finite = false;
  }
  if (!result.finite) return result;  // nothing is sent and no residual is kept
  const std::vector<float> thresholds = thresholds_of(args.scales_out, seg.count);

  const int64_t n5 = packed_length(seg.numel);
  uint8_t* header = args.out;
  uint8_t* table = header + kHeaderSize;
  uint8_t* body = table + kSegmentEntrySize * seg.count;
  int64_t body_length, zero_digits;
  int threads = (seg.numel >= (int64_t(1) << 18)) ? args.threads : 1;
  int64_t blocks = (n5 + kBlock - 1) / kBlock;
  if (threads <= 1 || blocks < 2) {
    BytePacker packer = byte_packer(args, thresholds, n5);
    uint8_t acc[kBlock];
    ZreWriter writer(body);
    for (int64_t j0 = 0; j0 < n5; j0 += kBlock) {
      int64_t j1 = std::min(n5, j0 + kBlock);
      if (args.zre) {
        packer.pack(j0, j1, acc);
        writer.push(acc, j1 - j0);
      } else {
        packer.pack(j0, j1, body + j0);
      }
    }
    body_length = args.zre ? writer.finish() : n5;
    zero_digits = args.zre ? writer.zero_digits() : count_zero_digits(body, n5);
  } else {
    // Threads pack disjoint block ranges in place; the zero-run pass that follows reads
    // the packed bytes front to back and writes no further than it has read.
    parallel_ranges(blocks, threads, [&](int64_t a, int64_t b, int) {
      BytePacker packer = byte_packer(args, thresholds, n5);
      for (int64_t block = a; block < b; ++block) {
        int64_t j0 = block * kBlock, j1 = std::min(n5, j0 + kBlock);
        packer.pack(j0, j1, body + j0);
      }
    });
    if (args.zre) {
      ZreWriter writer(body);
      writer.push(body, n5);
      body_length = writer.finish();
      zero_digits = writer.zero_digits();
    } else {
      body_length = n5;
      zero_digits = count_zero_digits(body, n5);
    }
  }
  result.zeros = zero_digits - (kTritsPerByte * n5 - seg.numel);  // padding digits are no values
#if defined(__SSE2__)
  _mm_sfence();  // the streamed residual is visible before the caller reads it
#endif

  std::memcpy(header, kMagic, 4);
  header[4] = kVersion;
  header[5] = static_cast<uint8_t>(args.header_dtype);
  header[6] = args.zre ? kFlagZre : 0;
  header[7] = 0;
  put_u64(header + 8, static_cast<uint64_t>(seg.numel));
  put_u64(header + 16, static_cast<uint64_t>(body_length));
  put_u32(header + 24, static_cast<uint32_t>(seg.count));
  put_u32(header + 28, 0);
  for (int64_t s = 0; s < seg.count; ++s) put_u64(table + 8 * s, static_cast<uint64_t>(seg.length[s]));
  std::memcpy(table + 8 * seg.count, args.scales_out, 4 * seg.count);
  result.length = kHeaderSize + kSegmentEntrySize * seg.count + body_length;
  return result;
}

// ---- lane packing for the allreduce transport (threelc/lanes.py) ----

int lane_bits(int world) {
  int bits = 0;
  while ((int64_t(1) << bits) < 2 * int64_t(world) + 1) ++bits;
  return std::max(1, bits);
}

int lanes_per_word(int world) { return 63 / lane_bits(world); }

int64_t encode_lanes(const LaneArgs& a) {
  const Segments& seg = *a.segments;
  const int lanes = lanes_per_word(a.world), bits = lane_bits(a.world);
  const int64_t words = (seg.numel + lanes - 1) / lanes;
  const std::vector<float> thresholds = thresholds_of(a.scales, seg.count);
  const int64_t blocks = (words + kBlock - 1) / kBlock;
  int threads = seg.numel >= (int64_t(1) << 18) ? a.threads : 1;
  std::vector<int64_t> zeros(std::max(threads, 1), 0);
  parallel_ranges(blocks, threads, [&](int64_t b0, int64_t b1, int t) {
    StreamPacker<int64_t> packer(a.x, a.x_dtype, a.residual, a.residual_out, seg, thresholds.data(), a.scales, words,
                                 lanes, bits);
    for (int64_t block = b0; block < b1; ++block) {
      int64_t w0 = block * kBlock, w1 = std::min(words, w0 + kBlock);
      zeros[t] += packer.pack(w0, w1, a.words + w0);
    }
  });
  int64_t total = 0;
  for (int64_t z : zeros) total += z;
  return total;
}

void decode_lanes(const int64_t* words, const float* scales, Segments& seg, int world, float* out, int threads) {
  const int lanes = lanes_per_word(world), bits = lane_bits(world);
  const int64_t width = (seg.numel + lanes - 1) / lanes;
  const int64_t mask = (int64_t(1) << bits) - 1;
  const float divisor = static_cast<float>(world);
  int usable = seg.numel >= (int64_t(1) << 18) ? threads : 1;
  parallel_ranges(seg.numel, usable, [&](int64_t i0, int64_t i1, int) {
    SegmentCursor cursor{&seg};
    int64_t i = i0;
    while (i < i1) {
      cursor.seek(i);
      int64_t s = cursor.seg, lane = i / width;
      int64_t stop = std::min({i1, seg.start[s + 1], (lane + 1) * width});
      const int64_t* w = words + (i - lane * width);
      float* o = out + seg.offset[s] + (i - seg.start[s]);
      const int shift = bits * static_cast<int>(lane);
      const float scale = scales[s];
      for (int64_t j = 0; j < stop - i; ++j) {
        int32_t sum = static_cast<int32_t>((w[j] >> shift) & mask) - world;
        o[j] = (static_cast<float>(sum) * scale) / divisor;
      }
      i = stop;
    }
  });
}

}  // namespace threelc
