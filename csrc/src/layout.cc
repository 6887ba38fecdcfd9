#include "llumnix_kv/layout.h"

#include <algorithm>
#include <sstream>
#include <utility>

namespace llumnix_kv {
namespace {

struct Dim {
  const char* name;
  int64_t extent;
  int64_t stride;
  int64_t region_mult;
};

}  // namespace

Status KvLayout::Validate() const {
  std::ostringstream why;
  if (num_layers <= 0 || num_blocks <= 0 || block_tokens <= 0 || num_heads <= 0) {
    why << "num_layers, num_blocks, block_tokens and num_heads must be positive";
  } else if (num_kv != 1 && num_kv != 2) {
    why << "num_kv must be 1 (MLA) or 2 (K and V), got " << num_kv;
  } else if (head_bytes <= 0) {
    why << "head_bytes must be positive";
  } else if (region_layer_mult < 0 || region_kv_mult < 0) {
    why << "region multipliers must be non-negative";
  }
  if (why.tellp() > 0) return Status::InvalidLayout(why.str() + ": " + ToString());

  const Dim dims[] = {
      {"layer", num_layers, layer_stride, region_layer_mult},
      {"kv", num_kv, kv_stride, region_kv_mult},
      {"block", num_blocks, block_stride, 0},
      {"token", block_tokens, token_stride, 0},
      {"head", num_heads, head_stride, 0},
  };
  std::vector<std::pair<int64_t, int64_t>> inner;  // (stride, extent) of dims inside a region
  int64_t span = head_bytes;                       // bytes from a region's first head vector to
                                                   // the end of its last
  for (const Dim& d : dims) {
    if (d.stride < 0) return Status::InvalidLayout(std::string(d.name) + " stride is negative");
    if (d.region_mult != 0) {
      if (d.stride != 0) {
        return Status::InvalidLayout(std::string(d.name) +
                                     " selects the region, so its byte stride must be 0");
      }
      continue;
    }
    if (d.extent > 1) {
      if (d.stride == 0) {
        return Status::InvalidLayout(std::string(d.name) + " has extent " +
                                     std::to_string(d.extent) + " but stride 0");
      }
      inner.emplace_back(d.stride, d.extent);
      span += (d.extent - 1) * d.stride;
    }
  }
  std::sort(inner.begin(), inner.end());
  int64_t covered = head_bytes;
  for (const auto& [stride, extent] : inner) {
    if (stride < covered) {
      return Status::InvalidLayout("strides overlap: a stride of " + std::to_string(stride) +
                                   " bytes is inside the " + std::to_string(covered) +
                                   " bytes of the dims nested below it: " + ToString());
    }
    covered = stride * extent;
  }

  // The (layer, kv) -> region map must be injective over the dims that select regions.
  const int64_t layers_sel = region_layer_mult != 0 ? num_layers : 1;
  const int64_t kvs_sel = region_kv_mult != 0 ? num_kv : 1;
  std::vector<char> used;
  for (int64_t l = 0; l < layers_sel; ++l) {
    for (int64_t k = 0; k < kvs_sel; ++k) {
      const int64_t r = RegionOf(l, k);
      if (r >= static_cast<int64_t>(regions.size())) {
        return Status::InvalidLayout("layer " + std::to_string(l) + " kv " + std::to_string(k) +
                                     " maps to region " + std::to_string(r) + " but only " +
                                     std::to_string(regions.size()) + " regions are given");
      }
      if (static_cast<int64_t>(used.size()) <= r) used.resize(r + 1, 0);
      if (used[r]) {
        return Status::InvalidLayout("two (layer, kv) pairs map to region " + std::to_string(r));
      }
      used[r] = 1;
      if (regions[r].bytes < static_cast<uint64_t>(span)) {
        return Status::InvalidLayout("region " + std::to_string(r) + " holds " +
                                     std::to_string(regions[r].bytes) + " bytes but the layout " +
                                     "spans " + std::to_string(span) + ": " + ToString());
      }
    }
  }
  return Status::Ok();
}

std::string KvLayout::ToString() const {
  std::ostringstream s;
  s << "KvLayout(layers=" << num_layers << ", kv=" << num_kv << ", blocks=" << num_blocks
    << ", block_tokens=" << block_tokens << ", heads=" << num_heads << ", head_bytes=" << head_bytes
    << ", dtype=" << (dtype.empty() ? "?" : dtype) << ", region_mult=(" << region_layer_mult << ", "
    << region_kv_mult << "), strides(layer, kv, block, token, head)=(" << layer_stride << ", "
    << kv_stride << ", " << block_stride << ", " << token_stride << ", " << head_stride
    << "), regions=" << regions.size() << ")";
  return s.str();
}

}  // namespace llumnix_kv
