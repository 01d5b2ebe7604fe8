// Lane packing for the allreduce transport (threelc/lanes.py): quantize with agreed
// scales into int64 words of ceil(log2(2N + 1))-bit lanes, and the average from the
// words an integer all-reduce summed.
#include "codec.h"
#include "quantize.h"

namespace threelc {

using namespace kernels;


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
