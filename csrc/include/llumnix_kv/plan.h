// CopyPlan: the byte segments that move a token range of a request's KV from one cache layout to
// another. Plans are pure data (region indices and byte offsets, no addresses): testable without
// memory, cacheable, and executable by any executor or transport.
#pragma once

#include <cstdint>
#include <vector>

#include "llumnix_kv/layout.h"
#include "llumnix_kv/status.h"

namespace llumnix_kv {

// Global KV-head indices [begin, end) of the model that one cache holds (its TP shard).
struct HeadRange {
  int32_t begin = 0;
  int32_t end = 0;
  int32_t size() const { return end - begin; }
};

struct LayerRange {
  int32_t begin = 0;
  int32_t end = -1;  // -1: through the last layer
};

// Struct of arrays, one entry per segment, in emission order (layer/kv regions outermost, then
// tokens in order). `staging_off[i]` is the segment's offset in a packed staging buffer
// (prefix sum of len), so gather/scatter need no second pass; staging_off has n + 1 entries.
struct CopyPlan {
  std::vector<int32_t> src_region;
  std::vector<int64_t> src_off;
  std::vector<int32_t> dst_region;
  std::vector<int64_t> dst_off;
  std::vector<int64_t> len;
  std::vector<int64_t> staging_off{0};

  size_t size() const { return len.size(); }
  int64_t total_bytes() const { return staging_off.back(); }
  void Clear();
  // Appends a segment, extending the previous one when both sides continue it.
  void Append(int32_t sr, int64_t so, int32_t dr, int64_t d_off, int64_t n);
};

struct CopySpec {
  const int32_t* src_blocks = nullptr;  // src block table: logical block i -> physical block id
  int64_t num_src_blocks = 0;
  HeadRange src_heads;
  const int32_t* dst_blocks = nullptr;
  int64_t num_dst_blocks = 0;
  HeadRange dst_heads;
  int64_t token_begin = 0;  // logical token range [token_begin, token_end) of the request
  int64_t token_end = 0;
  LayerRange layers;
};

// Plans the copy of tokens [token_begin, token_end), heads in both head ranges, of the given
// layers. On error `plan` is left empty.
Status PlanCopy(const KvLayout& src, const KvLayout& dst, const CopySpec& spec, CopyPlan* plan);

// Checks that every segment of `plan` lies inside the regions of `src` and of `dst` (a null
// layout is not checked).
Status CheckPlanBounds(const CopyPlan& plan, const KvLayout* src, const KvLayout* dst);

}  // namespace llumnix_kv
