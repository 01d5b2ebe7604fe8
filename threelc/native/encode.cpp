// Encode with error feedback: per-segment absmax, then one pass that compensates,
// quantizes by the exact rounding thresholds, writes the new residual and the
// base-3^5 bytes, with zero-run encoding streamed behind it.
#include "codec.h"
#include "quantize.h"

namespace threelc {

using namespace kernels;

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

void segment_absmax(const void* x, int x_dtype, const float* residual, Segments& seg, float* out, int threads,
                    bool bounded) {
  // Work items of at most kChunk elements, so one big segment still spreads over threads.
  constexpr int64_t kChunk = 1 << 16;
  struct Item { int64_t s, lo, n; };
  std::vector<Item> items;
  for (int64_t s = 0; s < seg.count; ++s)
    for (int64_t lo = 0; lo < seg.length[s]; lo += kChunk) items.push_back({s, lo, std::min(kChunk, seg.length[s] - lo)});
  std::vector<AbsmaxBits> partial(items.size());
  int usable = seg.numel >= (int64_t(1) << 18) ? threads : 1;
  parallel_ranges(static_cast<int64_t>(items.size()), usable, [&](int64_t a, int64_t b, int) {
    for (int64_t w = a; w < b; ++w)
      partial[w] = absmax_dispatch(x, x_dtype, residual, seg.offset[items[w].s] + items[w].lo, items[w].n, bounded);
  });
  std::vector<AbsmaxBits> best(seg.count);
  for (size_t w = 0; w < items.size(); ++w) {
    AbsmaxBits& b = best[items[w].s];
    b.compensated = std::max(b.compensated, partial[w].compensated);
    b.gradient = std::max(b.gradient, partial[w].gradient);
  }
  for (int64_t s = 0; s < seg.count; ++s) {
    uint32_t bits = bounded_bits(best[s]);  // without the bound both fields hold max|x + r|
    if (bits > 0x7F800000u) {
      out[s] = canonical_nan();
    } else {
      std::memcpy(&out[s], &bits, 4);
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
  segment_absmax(args.x, args.x_dtype, args.residual, seg, args.scales_out, args.threads, args.bounded);
  for (int64_t s = 0; s < seg.count; ++s) {
    float scale = scale_from_absmax(args.scales_out[s], args.sparsity);
    if (!std::isfinite(scale)) {
      result.finite = false;
    } else if (args.scale_cap != nullptr && args.scale_cap[s] < scale) {  // quantize.cap_scales
      scale = args.scale_cap[s];
    }
    args.scales_out[s] = scale;
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

}  // namespace threelc
