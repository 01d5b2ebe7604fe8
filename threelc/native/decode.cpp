// Decode-and-accumulate: N payloads of one bucket summed into the output in one pass,
// in rank order, with every check of the wire format. Zero runs are expanded block by
// block into a small buffer, never into a buffer of the bucket's size.
#include "codec.h"

namespace threelc {

namespace {

inline uint64_t get_u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline uint32_t get_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// Bit 7 of each byte of the result is set where that byte of w is >= 243.
inline uint64_t run_bytes(uint64_t w) {
  return ((w & 0x7F7F7F7F7F7F7F7Full) + 0x0D0D0D0D0D0D0D0Dull) & w & 0x8080808080808080ull;
}

struct Parsed {
  const float* scales;  // unaligned in the payload: copied out by the caller
  const uint8_t* body;
  int64_t body_length;
  bool zre;
};

bool parse(const uint8_t* p, int64_t size, const Segments& expected, Parsed* out, std::string* error) {
  if (size < kHeaderSize) {
    *error = "payload of " + std::to_string(size) + " bytes is truncated: the header alone is 32";
    return false;
  }
  if (std::memcmp(p, kMagic, 4) != 0) { *error = "not a 3LC payload: bad magic"; return false; }
  if (p[4] != kVersion) {
    *error = "payload has wire-format version " + std::to_string(p[4]) + "; this threelc reads version 1";
    return false;
  }
  if (p[5] < kFloat32 || p[5] > kBFloat16) { *error = "unknown dtype code " + std::to_string(p[5]); return false; }
  if ((p[6] & ~kFlagZre) || p[7] || get_u32(p + 28)) { *error = "unknown flags or non-zero reserved bytes"; return false; }
  uint64_t numel = get_u64(p + 8), body_length = get_u64(p + 16);
  uint32_t count = get_u32(p + 24);
  if (count < 1) { *error = "payload declares no segments"; return false; }
  uint64_t prefix = kHeaderSize + kSegmentEntrySize * static_cast<uint64_t>(count);
  if (body_length > static_cast<uint64_t>(size) || prefix + body_length != static_cast<uint64_t>(size)) {
    *error = "payload is " + std::to_string(size) + " bytes but its header describes a different size";
    return false;
  }
  bool zre = p[6] & kFlagZre;
  uint64_t packed = numel / kTritsPerByte + (numel % kTritsPerByte != 0);
  bool fits = zre ? (body_length <= packed && packed / kMaxRun <= body_length && packed <= kMaxRun * body_length)
                  : body_length == packed;
  if (!fits) { *error = "a body of " + std::to_string(body_length) + " bytes cannot hold the values"; return false; }
  const uint8_t* table = p + kHeaderSize;
  if (static_cast<int64_t>(count) != expected.count || numel != static_cast<uint64_t>(expected.numel)) {
    *error = "describes " + std::to_string(numel) + " elements in " + std::to_string(count) + " segments; expected " +
             std::to_string(expected.numel) + " in " + std::to_string(expected.count);
    return false;
  }
  for (uint32_t s = 0; s < count; ++s) {
    if (get_u64(table + 8 * s) != static_cast<uint64_t>(expected.length[s])) {
      *error = "segment " + std::to_string(s) + " has another length than expected";
      return false;
    }
  }
  const uint8_t* scale_bytes = table + 8 * static_cast<uint64_t>(count);
  for (uint32_t s = 0; s < count; ++s) {
    float scale;
    std::memcpy(&scale, scale_bytes + 4 * s, 4);
    if (scale < 0 || (scale == 0 && std::signbit(scale))) {  // NaN and +inf mark a non-finite input and pass
      *error = "payload holds a negative scale";
      return false;
    }
  }
  out->scales = reinterpret_cast<const float*>(scale_bytes);
  out->body = p + prefix;
  out->body_length = static_cast<int64_t>(body_length);
  out->zre = zre;
  return true;
}

template <int P, bool First, bool Plain>
void add_digits(const uint8_t* bytes, int64_t n, float scale, float* sum) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(static_cast<int>((bytes[j] / P) % 3) - 1) * scale;
    if (Plain) sum[j] = v;               // one payload, not averaged: q * scale as dequantize
    else if (First) sum[j] = 0.0f + v;   // the pure path starts from a zero tensor
    else sum[j] = sum[j] + v;
  }
}

template <int P>
void add_digits(const uint8_t* bytes, int64_t n, float scale, float* sum, bool first, bool plain) {
  if (plain) add_digits<P, true, true>(bytes, n, scale, sum);
  else if (first) add_digits<P, true, false>(bytes, n, scale, sum);
  else add_digits<P, false, false>(bytes, n, scale, sum);
}

void add_stream(int k, const uint8_t* bytes, int64_t n, float scale, float* sum, bool first, bool plain) {
  switch (k) {
    case 0: add_digits<81>(bytes, n, scale, sum, first, plain); break;
    case 1: add_digits<27>(bytes, n, scale, sum, first, plain); break;
    case 2: add_digits<9>(bytes, n, scale, sum, first, plain); break;
    case 3: add_digits<3>(bytes, n, scale, sum, first, plain); break;
    default: add_digits<1>(bytes, n, scale, sum, first, plain); break;
  }
}

// out[j] = sum[j] (kCopy), sum[j] * factor (kMultiply) or sum[j] / factor (kDivide).
// The output is not read again here, so once it is 64-byte aligned it is written with
// streaming stores (no read of each line before writing it).
enum StoreMode { kCopy, kMultiply, kDivide };

template <StoreMode M>
inline float finish(float v, float factor) {
  return M == kCopy ? v : M == kMultiply ? v * factor : v / factor;
}

template <StoreMode M>
void store(float* __restrict__ out, const float* __restrict__ sum, int64_t n, float factor) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(out) & 3) == 0) {
    int64_t head = std::min(n, static_cast<int64_t>(((64 - (reinterpret_cast<uintptr_t>(out) & 63)) & 63) / 4));
    for (; j < head; ++j) out[j] = finish<M>(sum[j], factor);
    const __m512 f = _mm512_set1_ps(factor);
    for (; j + 16 <= n; j += 16) {
      __m512 v = _mm512_loadu_ps(sum + j);
      if (M == kMultiply) v = _mm512_mul_ps(v, f);
      if (M == kDivide) v = _mm512_div_ps(v, f);
      _mm512_stream_ps(out + j, v);
    }
  }
#endif
  for (; j < n; ++j) out[j] = finish<M>(sum[j], factor);
}

constexpr int kPower[kTritsPerByte] = {81, 27, 9, 3, 1};

// Decodes blocks [block_begin, block_end) with readers already positioned at the first.
bool decode_blocks(const DecodeArgs& args, std::vector<ZreReader>& readers, const std::vector<float>& scales,
                   int64_t n5, int64_t block_begin, int64_t block_end, std::string* error, int64_t* bad) {
  const Segments& seg = *args.segments;
  const int64_t count = args.count;
  constexpr int64_t stride = kBlock + kReadSlack;
  std::vector<uint8_t> bytes(count * stride);
  std::vector<float> sum(kBlock);
  SegmentCursor cursor[kTritsPerByte];
  for (auto& c : cursor) c.table = &seg;
  const float divisor = static_cast<float>(count);
  // x / 2^k and x * 2^-k are the same correctly rounded number: multiply when we can.
  const bool power_of_two = (count & (count - 1)) == 0;
  const float reciprocal = 1.0f / divisor;
  const bool plain = !args.average;
  for (int64_t block = block_begin; block < block_end; ++block) {
    int64_t j0 = block * kBlock, j1 = std::min(n5, j0 + kBlock), width = j1 - j0;
    for (int64_t r = 0; r < count; ++r) {
      if (!readers[r].read(bytes.data() + r * stride, width, error)) { *bad = r; return false; }
    }
    for (int k = 0; k < kTritsPerByte; ++k) {
      int64_t i = k * n5 + j0, end = k * n5 + j1, real_end = std::min(end, seg.numel);
      while (i < real_end) {
        cursor[k].seek(i);
        int64_t s = cursor[k].seg, stop = std::min(real_end, seg.start[s + 1]), n = stop - i;
        int64_t local = i - k * n5 - j0;
        for (int64_t r = 0; r < count; ++r)
          add_stream(k, bytes.data() + r * stride + local, n, scales[r * seg.count + s], sum.data(), r == 0, plain);
        float* out = args.out + seg.offset[s] + (i - seg.start[s]);
        if (plain) store<kCopy>(out, sum.data(), n, 1.0f);
        else if (power_of_two) store<kMultiply>(out, sum.data(), n, reciprocal);
        else store<kDivide>(out, sum.data(), n, divisor);
        i = stop;
      }
      for (int64_t p = std::max(i, k * n5 + j0); p < end; ++p) {  // padding must be t = 1 (q = 0)
        for (int64_t r = 0; r < count; ++r) {
          if ((bytes[r * stride + (p - k * n5 - j0)] / kPower[k]) % 3 != 1) {
            *error = "padding after the last value is not q = 0";
            *bad = r;
            return false;
          }
        }
      }
    }
  }
  return true;
}

}  // namespace

bool ZreReader::read(uint8_t* dst, int64_t n, std::string* error) {
  while (n > 0) {
    if (pending) {
      int64_t k = std::min(pending, n);
      std::memset(dst, kZeroGroup, k);
      dst += k, n -= k, pending -= k;
      continue;
    }
    if (pos >= length) { *error = "zero-run data expands to fewer bytes than the header says"; return false; }
    if (!zre) {
      int64_t k = std::min(n, length - pos);
      uint8_t high = 0;
      for (int64_t j = 0; j < k; ++j) high = std::max(high, body[pos + j]);
      if (high > kMaxPacked) { *error = "packed byte " + std::to_string(high) + " is above 242: not base-3^5 data"; return false; }
      std::memcpy(dst, body + pos, k);
      dst += k, n -= k, pos += k;
      continue;
    }
#if defined(__SSE2__)
    // Most of a sparse body is run bytes and lone literals: one 16-byte store of zero
    // groups per run byte (dst has kReadSlack bytes of room past n) beats a memset each.
    const __m128i zero_groups = _mm_set1_epi8(static_cast<char>(kZeroGroup));
    while (n >= 16 && pos < length) {
      uint8_t b = body[pos++];
      if (b >= kMinRunByte) {
        int64_t k = b - kRunBase;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), zero_groups);
        dst += k, n -= k;
      } else {
        *dst++ = b;
        --n;
      }
    }
    if (n == 0) break;
    if (pos >= length) continue;  // reports the short body above
#endif
    int64_t limit = std::min(n, length - pos), m = 0;
    while (m + 8 <= limit) {
      uint64_t w;
      std::memcpy(&w, body + pos + m, 8);
      if (run_bytes(w)) break;
      m += 8;
    }
    while (m < limit && body[pos + m] < kMinRunByte) ++m;
    if (m) {
      std::memcpy(dst, body + pos, m);
      dst += m, n -= m, pos += m;
      continue;
    }
    pending = body[pos++] - kRunBase;
  }
  return true;
}

bool ZreReader::skip(int64_t n, std::string* error) {
  if (!zre) {
    if (n > length - pos) { *error = "body shorter than the header says"; return false; }
    pos += n;
    return true;
  }
  while (n > 0) {
    if (pending) {
      int64_t k = std::min(pending, n);
      n -= k, pending -= k;
      continue;
    }
    if (pos >= length) { *error = "zero-run data expands to fewer bytes than the header says"; return false; }
    uint8_t b = body[pos++];
    if (b >= kMinRunByte) pending = b - kRunBase;
    else --n;
  }
  return true;
}

bool ZreReader::finished(std::string* error) const {
  if (pos != length || pending) { *error = "zero-run data expands to more bytes than the header says"; return false; }
  return true;
}

int64_t decode(const DecodeArgs& args, std::string* error) {
  Segments& seg = *args.segments;
  std::vector<ZreReader> readers;
  std::vector<float> scales(args.count * seg.count);
  for (int64_t r = 0; r < args.count; ++r) {
    Parsed parsed;
    if (!parse(args.payload[r], args.payload_length[r], seg, &parsed, error)) return r + 1;
    std::memcpy(&scales[r * seg.count], parsed.scales, 4 * seg.count);
    readers.push_back(ZreReader{parsed.body, parsed.body_length, parsed.zre});
  }
  const int64_t n5 = packed_length(seg.numel);
  const int64_t blocks = (n5 + kBlock - 1) / kBlock;
  int threads = seg.numel >= (int64_t(1) << 18) ? std::min<int64_t>(args.threads, blocks) : 1;
  int64_t bad = 0;
  if (threads <= 1) {
    if (!decode_blocks(args, readers, scales, n5, 0, blocks, error, &bad)) return bad + 1;
  } else {
    // Position a copy of every reader at each thread's first block (a scan of the
    // compressed bodies), then decode the ranges in parallel.
    std::vector<std::vector<ZreReader>> starts(threads, readers);
    for (int t = 1; t < threads; ++t) {
      int64_t from = (blocks * (t - 1) / threads) * kBlock, to = (blocks * t / threads) * kBlock;
      for (int64_t r = 0; r < args.count; ++r) {
        starts[t][r] = starts[t - 1][r];
        if (!starts[t][r].skip(to - from, error)) return r + 1;
      }
    }
    std::vector<std::string> errors(threads);
    std::vector<int64_t> bads(threads, -1);
    parallel_ranges(blocks, threads, [&](int64_t a, int64_t b, int t) {
      if (!decode_blocks(args, starts[t], scales, n5, a, b, &errors[t], &bads[t]) && bads[t] < 0) bads[t] = 0;
    });
    for (int t = 0; t < threads; ++t) {
      if (!errors[t].empty()) { *error = errors[t]; return bads[t] + 1; }
    }
    readers = starts[threads - 1];
  }
#if defined(__SSE2__)
  _mm_sfence();  // streamed output visible before the caller reads it
#endif
  for (int64_t r = 0; r < args.count; ++r) {
    if (!readers[r].finished(error)) return r + 1;
  }
  return 0;
}

}  // namespace threelc
