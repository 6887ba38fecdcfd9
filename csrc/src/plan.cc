#include "llumnix_kv/plan.h"

#include <algorithm>
#include <string>

namespace llumnix_kv {
namespace {

// One dim of a (chunk of a) copy inside a region pair: extent and byte stride on each side.
struct PlanDim {
  int64_t extent;
  int64_t src_stride;
  int64_t dst_stride;
};

constexpr int kMaxDims = 4;  // layer, kv, token, head

// Emits the segments of one chunk: head vectors of `elem` bytes at
// base + sum(i_d * stride_d) on each side, for i_d < extent_d. Dims are ordered innermost-first
// by source stride; leading dims contiguous on both sides fold into the segment length, and
// adjacent dims that nest on both sides fold into one loop.
void EmitChunk(int32_t src_region, int64_t src_base, int32_t dst_region, int64_t dst_base,
               const PlanDim* dims, int num_dims, int64_t elem, CopyPlan* plan) {
  PlanDim d[kMaxDims];
  int m = 0;
  for (int i = 0; i < num_dims; ++i) {
    if (dims[i].extent > 1) d[m++] = dims[i];
  }
  std::sort(d, d + m, [](const PlanDim& a, const PlanDim& b) {
    return a.src_stride != b.src_stride ? a.src_stride < b.src_stride : a.dst_stride < b.dst_stride;
  });
  int64_t seg = elem;
  int first = 0;
  while (first < m && d[first].src_stride == seg && d[first].dst_stride == seg) {
    seg *= d[first].extent;
    ++first;
  }
  PlanDim loops[kMaxDims];
  int k = 0;
  for (int i = first; i < m; ++i) {
    if (k > 0 && d[i].src_stride == loops[k - 1].src_stride * loops[k - 1].extent &&
        d[i].dst_stride == loops[k - 1].dst_stride * loops[k - 1].extent) {
      loops[k - 1].extent *= d[i].extent;
    } else {
      loops[k++] = d[i];
    }
  }
  int64_t idx[kMaxDims] = {0, 0, 0, 0};
  int64_t so = src_base;
  int64_t dof = dst_base;
  while (true) {
    plan->Append(src_region, so, dst_region, dof, seg);
    int j = 0;
    for (; j < k; ++j) {
      if (++idx[j] < loops[j].extent) {
        so += loops[j].src_stride;
        dof += loops[j].dst_stride;
        break;
      }
      so -= (loops[j].extent - 1) * loops[j].src_stride;
      dof -= (loops[j].extent - 1) * loops[j].dst_stride;
      idx[j] = 0;
    }
    if (j == k) return;
  }
}

Status CheckBlockTable(const char* side, const int32_t* blocks, int64_t n, int32_t num_blocks) {
  if (n > 0 && blocks == nullptr)
    return Status::InvalidArgument(std::string(side) + " block table is null");
  for (int64_t i = 0; i < n; ++i) {
    if (blocks[i] < 0 || blocks[i] >= num_blocks) {
      return Status::OutOfRange(std::string(side) + " block id " + std::to_string(blocks[i]) +
                                " at position " + std::to_string(i) + " is outside [0, " +
                                std::to_string(num_blocks) + ")");
    }
  }
  return Status::Ok();
}

Status CheckHeads(const char* side, HeadRange heads, const KvLayout& layout) {
  if (heads.begin < 0 || heads.size() != layout.num_heads) {
    return Status::InvalidArgument(std::string(side) + " head range [" +
                                   std::to_string(heads.begin) + ", " + std::to_string(heads.end) +
                                   ") does not hold the layout's " +
                                   std::to_string(layout.num_heads) + " heads");
  }
  return Status::Ok();
}

bool InRegion(int32_t region, int64_t off, int64_t len, const KvLayout& layout) {
  return region >= 0 && static_cast<size_t>(region) < layout.regions.size() && off >= 0 &&
         static_cast<uint64_t>(off + len) <= layout.regions[region].bytes;
}

Status CheckSpec(const KvLayout& src, const KvLayout& dst, const CopySpec& spec,
                 LayerRange* layers) {
  LLUMNIX_KV_RETURN_IF_ERROR(src.Validate());
  LLUMNIX_KV_RETURN_IF_ERROR(dst.Validate());
  if (src.num_layers != dst.num_layers || src.num_kv != dst.num_kv ||
      src.head_bytes != dst.head_bytes ||
      (!src.dtype.empty() && !dst.dtype.empty() && src.dtype != dst.dtype)) {
    return Status::LayoutMismatch("layouts describe different models: src " + src.ToString() +
                                  ", dst " + dst.ToString());
  }
  LLUMNIX_KV_RETURN_IF_ERROR(CheckHeads("src", spec.src_heads, src));
  LLUMNIX_KV_RETURN_IF_ERROR(CheckHeads("dst", spec.dst_heads, dst));
  if (std::max(spec.src_heads.begin, spec.dst_heads.begin) >=
      std::min(spec.src_heads.end, spec.dst_heads.end)) {
    return Status::InvalidArgument("src and dst head ranges are disjoint");
  }
  *layers = spec.layers;
  if (layers->end < 0) layers->end = src.num_layers;
  if (layers->begin < 0 || layers->begin >= layers->end || layers->end > src.num_layers) {
    return Status::OutOfRange("layer range [" + std::to_string(spec.layers.begin) + ", " +
                              std::to_string(spec.layers.end) + ") is not inside [0, " +
                              std::to_string(src.num_layers) + ")");
  }
  if (spec.token_begin < 0 || spec.token_begin > spec.token_end) {
    return Status::InvalidArgument("token range [" + std::to_string(spec.token_begin) + ", " +
                                   std::to_string(spec.token_end) + ") is malformed");
  }
  const int64_t src_cap = spec.num_src_blocks * src.block_tokens;
  const int64_t dst_cap = spec.num_dst_blocks * dst.block_tokens;
  if (spec.token_end > src_cap || spec.token_end > dst_cap) {
    return Status::OutOfRange("token range ends at " + std::to_string(spec.token_end) +
                              " but the block tables hold " + std::to_string(src_cap) +
                              " (src) and " + std::to_string(dst_cap) + " (dst) tokens");
  }
  LLUMNIX_KV_RETURN_IF_ERROR(
      CheckBlockTable("src", spec.src_blocks, spec.num_src_blocks, src.num_blocks));
  return CheckBlockTable("dst", spec.dst_blocks, spec.num_dst_blocks, dst.num_blocks);
}

}  // namespace

void CopyPlan::Clear() {
  src_region.clear();
  src_off.clear();
  dst_region.clear();
  dst_off.clear();
  len.clear();
  staging_off.assign(1, 0);
}

void CopyPlan::Append(int32_t sr, int64_t so, int32_t dr, int64_t d_off, int64_t n) {
  if (!len.empty()) {
    const size_t i = len.size() - 1;
    if (src_region[i] == sr && dst_region[i] == dr && src_off[i] + len[i] == so &&
        dst_off[i] + len[i] == d_off) {
      len[i] += n;
      staging_off.back() += n;
      return;
    }
  }
  src_region.push_back(sr);
  src_off.push_back(so);
  dst_region.push_back(dr);
  dst_off.push_back(d_off);
  len.push_back(n);
  staging_off.push_back(staging_off.back() + n);
}

Status PlanCopy(const KvLayout& src, const KvLayout& dst, const CopySpec& spec, CopyPlan* plan) {
  plan->Clear();
  LayerRange layers;
  LLUMNIX_KV_RETURN_IF_ERROR(CheckSpec(src, dst, spec, &layers));

  const int32_t head_begin = std::max(spec.src_heads.begin, spec.dst_heads.begin);
  const int32_t head_end = std::min(spec.src_heads.end, spec.dst_heads.end);
  const int64_t src_head0 = int64_t{head_begin - spec.src_heads.begin} * src.head_stride;
  const int64_t dst_head0 = int64_t{head_begin - spec.dst_heads.begin} * dst.head_stride;

  // Layer and K/V loop outside the token chunks when they select the region on either side, or
  // when the source nests them outside blocks (e.g. vLLM FlashAttention's [2, blocks, ...]):
  // then consecutive blocks of one (layer, kv) are emitted back to back and can merge.
  // Otherwise they stay strided dims inside each chunk and may fold into its segments.
  const bool layer_outer = src.region_layer_mult != 0 || dst.region_layer_mult != 0 ||
                           src.layer_stride > src.block_stride;
  const bool kv_outer =
      src.region_kv_mult != 0 || dst.region_kv_mult != 0 || src.kv_stride > src.block_stride;
  const int32_t num_layers = layers.end - layers.begin;
  const int32_t outer_layers = layer_outer ? num_layers : 1;
  const int32_t outer_kvs = kv_outer ? src.num_kv : 1;

  PlanDim dims[kMaxDims];
  int nd = 0;
  if (!layer_outer) dims[nd++] = {num_layers, src.layer_stride, dst.layer_stride};
  if (!kv_outer) dims[nd++] = {src.num_kv, src.kv_stride, dst.kv_stride};
  const int token_dim = nd;
  dims[nd++] = {0, src.token_stride, dst.token_stride};
  dims[nd++] = {head_end - head_begin, src.head_stride, dst.head_stride};

  for (int32_t ol = 0; ol < outer_layers; ++ol) {
    for (int32_t ok = 0; ok < outer_kvs; ++ok) {
      const int64_t layer = layers.begin + ol;
      const int32_t sr = static_cast<int32_t>(src.RegionOf(layer, ok));
      const int32_t dr = static_cast<int32_t>(dst.RegionOf(layer, ok));
      const int64_t src_outer = src.OffsetOf(layer, ok, 0, 0, 0) + src_head0;
      const int64_t dst_outer = dst.OffsetOf(layer, ok, 0, 0, 0) + dst_head0;
      // Chunks: maximal token runs that stay in one source block and one destination block.
      for (int64_t t = spec.token_begin; t < spec.token_end;) {
        const int64_t s_in = t % src.block_tokens;
        const int64_t d_in = t % dst.block_tokens;
        const int64_t n =
            std::min({src.block_tokens - s_in, dst.block_tokens - d_in, spec.token_end - t});
        const int64_t s_blk = spec.src_blocks[t / src.block_tokens];
        const int64_t d_blk = spec.dst_blocks[t / dst.block_tokens];
        dims[token_dim].extent = n;
        EmitChunk(sr, src_outer + s_blk * src.block_stride + s_in * src.token_stride, dr,
                  dst_outer + d_blk * dst.block_stride + d_in * dst.token_stride, dims, nd,
                  src.head_bytes, plan);
        t += n;
      }
    }
  }
  return Status::Ok();
}

Status CheckPlanBounds(const CopyPlan& plan, const KvLayout* src, const KvLayout* dst) {
  for (size_t i = 0; i < plan.size(); ++i) {
    if ((src && !InRegion(plan.src_region[i], plan.src_off[i], plan.len[i], *src)) ||
        (dst && !InRegion(plan.dst_region[i], plan.dst_off[i], plan.len[i], *dst))) {
      return Status::OutOfRange("plan segment " + std::to_string(i) +
                                " lies outside the regions of the given layouts");
    }
  }
  return Status::Ok();
}

}  // namespace llumnix_kv
