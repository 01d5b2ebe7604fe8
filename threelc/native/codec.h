// threelc native codec: the fused CPU kernels behind threelc/backends.py.
//
// Everything here must produce the same bytes and the same float bits as the
// pure-PyTorch codec (threelc/quantize.py, packing.py, zre.py, wire.py, lanes.py).
// That is why the arithmetic is spelled out operation by operation and the file is
// compiled without fast-math or floating-point contraction (see setup.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace threelc {

// ---- wire format constants (docs/algorithm.md; mirrored from threelc/wire.py) ----
constexpr uint8_t kMagic[4] = {'3', 'L', 'C', 0};
constexpr uint8_t kVersion = 1;
constexpr uint8_t kFlagZre = 0x01;
constexpr int64_t kHeaderSize = 32;
constexpr int64_t kSegmentEntrySize = 12;  // u64 length + f32 scale
constexpr int kTritsPerByte = 5;
constexpr uint8_t kZeroGroup = 121;    // five q = 0
constexpr uint8_t kMaxPacked = 242;    // 3^5 - 1
constexpr uint8_t kRunBase = 241;      // byte 241 + r stands for r zero groups
constexpr uint8_t kMinRunByte = 243;
constexpr int kMaxRun = 14;            // byte 255

enum DType : int { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int64_t packed_length(int64_t numel) { return (numel + kTritsPerByte - 1) / kTritsPerByte; }

// Elements are processed in blocks of this many packed bytes (or lane words), so the
// five (or L) interleaved streams of a block stay in L1/L2.
constexpr int64_t kBlock = 8192;

// A table of segments in payload order. Segment s covers payload elements
// [start[s], start[s] + length[s]) and lives at element offset[s] of the tensor it is
// read from (encode) or written to (decode).
struct Segments {
  int64_t count = 0;
  const int64_t* length = nullptr;
  const int64_t* offset = nullptr;
  std::vector<int64_t> start;  // filled by prepare()
  int64_t numel = 0;

  void prepare() {
    start.resize(count + 1);
    int64_t total = 0;
    for (int64_t s = 0; s < count; ++s) {
      start[s] = total;
      total += length[s];
    }
    start[count] = total;
    numel = total;
  }
};

// Walks the segments of one stream of consecutive payload elements, in order.
struct SegmentCursor {
  const Segments* table;
  int64_t seg = 0;
  void seek(int64_t element) {  // first segment whose end is past `element` (skips empty ones)
    while (seg < table->count && table->start[seg + 1] <= element) ++seg;
  }
};

// ---- float loads: every supported dtype widens exactly to float32 ----
float half_to_float(uint16_t h);  // table lookup, built once (encode.cpp)

struct LoadF32 {
  using T = float;
  static inline float load(T v) { return v; }
};
struct LoadBF16 {
  using T = uint16_t;
  static inline float load(T v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
struct LoadF16 {
  using T = uint16_t;
  static inline float load(T v) { return half_to_float(v); }
};

// A canonical quiet NaN, so a non-finite scale has the same bits on every backend.
inline float canonical_nan() {
  uint32_t bits = 0x7FC00000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// scale = fl32(absmax * fl32(sparsity)), clamped so that a finite max never overflows;
// NaN stays NaN (canonical) and +inf stays +inf.
inline float scale_from_absmax(float absmax, float sparsity) {
  if (std::isnan(absmax)) return canonical_nan();
  float scale = absmax * sparsity;
  if (std::isfinite(absmax) && scale > std::numeric_limits<float>::max()) scale = std::numeric_limits<float>::max();
  return scale;
}

// The smallest float32 t with fl(t / scale) > 0.5: for |x| <= scale, round(x / scale)
// (half to even) is +1 exactly when x >= t and -1 exactly when x <= -t. Same search as
// threelc.quantize.round_thresholds.
inline float round_threshold(float scale) {
  if (!(std::isfinite(scale) && scale > 0)) return scale == 0 ? std::numeric_limits<float>::infinity() : canonical_nan();
  const float half = 0.5f;
  float t = half * scale;
  for (int i = 0; i < 64; ++i) {
    float lower = std::nextafter(t, 0.0f);
    bool step_down = (lower / scale > half) && (lower > 0);
    bool step_up = !(t / scale > half);
    if (!step_down && !step_up) break;
    t = step_down ? lower : std::nextafter(t, std::numeric_limits<float>::infinity());
  }
  return t;
}

// ---- threads: contiguous ranges of [0, n), one per thread, the caller's thread included ----
template <class F>
void parallel_ranges(int64_t n, int threads, F&& body) {
  if (threads > n) threads = static_cast<int>(n);
  if (threads <= 1) {
    body(0, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&body, n, threads, t] { body(n * t / threads, n * (t + 1) / threads, t); });
  body(0, n / threads, 0);
  for (auto& thread : pool) thread.join();
}

// ---- zero-run encoding, streamed ----
struct ZreWriter {
  uint8_t* out;
  int64_t pos = 0;
  int64_t run = 0;                  // pending zero groups
  int64_t zero_groups = 0;          // bytes 121 seen
  int64_t literal_zero_digits = 0;  // t = 1 digits in the other bytes

  explicit ZreWriter(uint8_t* destination) : out(destination) {}
  void flush_run() {
    while (run >= kMaxRun) {
      out[pos++] = 255;
      run -= kMaxRun;
    }
    if (run >= 2) out[pos++] = static_cast<uint8_t>(kRunBase + run);
    else if (run == 1) out[pos++] = kZeroGroup;
    run = 0;
  }
  void push(const uint8_t* bytes, int64_t n);  // encode.cpp
  void literals(const uint8_t* bytes, int64_t n);
  int64_t zero_digits() const { return kTritsPerByte * zero_groups + literal_zero_digits; }
  int64_t finish() {
    flush_run();
    return pos;
  }
};

// ---- zero-run decoding, streamed, with every check of the wire format ----
constexpr int64_t kReadSlack = 16;  // ZreReader::read may write this far past what it was asked for

struct ZreReader {
  const uint8_t* body;
  int64_t length;
  bool zre;
  int64_t pos = 0;
  int64_t pending = 0;  // zero groups of a run not yet expanded

  // Expands the next n packed bytes into dst; false (with a message) on malformed data.
  bool read(uint8_t* dst, int64_t n, std::string* error);
  // Advances n packed bytes without writing them (used to split work between threads).
  bool skip(int64_t n, std::string* error);
  bool finished(std::string* error) const;
};

// ---- the kernels (encode.cpp, decode.cpp, lanes.cpp) ----
struct EncodeArgs {
  const void* x;          // input tensor data, dtype `x_dtype`
  int x_dtype;
  const float* residual;  // may be null: no residual yet
  float* residual_out;    // may be null: error feedback off
  Segments* segments;     // offsets index x / residual / residual_out
  float sparsity;
  int header_dtype;       // dtype code written into the header
  bool zre;
  uint8_t* out;           // capacity >= payload_capacity()
  float* scales_out;      // count floats
  int threads;
  bool bounded;           // scale from min(max|x + r|, max|x|) (quantize.bounded_absmax)
  const float* scale_cap; // may be null; else count floats: a finite scale is at most its cap
};
struct EncodeResult {
  int64_t length = 0;  // payload bytes (0 when not finite)
  bool finite = true;
  int64_t zeros = 0;   // ternary zeros among the numel values
};
int64_t payload_capacity(int64_t segments, int64_t numel);
EncodeResult encode(const EncodeArgs& args);

// max|x + residual| of each segment (NaN if any NaN; 0 for an empty segment); `bounded`:
// at most max|x| where both are finite, read in the same pass.
void segment_absmax(const void* x, int x_dtype, const float* residual, Segments& segments, float* out, int threads,
                    bool bounded);

struct DecodeArgs {
  int64_t count;                  // payloads, summed in this order
  const uint8_t* const* payload;
  const int64_t* payload_length;
  Segments* segments;             // the layout every payload must declare; offsets index out
  float* out;
  bool average;                   // out = (0 + d_0 + ... + d_{N-1}) / N; else out = d_0 (count 1)
  int threads;
};
// 0 on success; otherwise 1 + the index of the offending payload, with `error` set.
int64_t decode(const DecodeArgs& args, std::string* error);

struct LaneArgs {
  const void* x;
  int x_dtype;
  const float* residual;
  float* residual_out;
  Segments* segments;
  const float* scales;  // agreed scales, one per segment
  int world;
  int64_t* words;       // word_count(numel, world) int64 words
  int threads;
};
int lane_bits(int world);
int lanes_per_word(int world);
int64_t encode_lanes(const LaneArgs& args);  // returns ternary zeros
void decode_lanes(const int64_t* words, const float* scales, Segments& segments, int world, float* out, int threads);

}  // namespace threelc
