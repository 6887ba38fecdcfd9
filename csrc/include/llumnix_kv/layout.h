// KvLayout: one description of any engine's paged KV cache.
//
// A cache is a set of memory regions (one tensor per layer, per layer per K/V, or one for all
// layers). The unit of addressing is a *head vector*: the `head_bytes` contiguous bytes of one
// (layer, kv, block, token_in_block, head) element (head_dim * elem_size; for MLA the whole
// latent vector, with num_kv == 1 and num_heads == 1). Its place is
//
//   region = layer * region_layer_mult + kv * region_kv_mult            (index into regions)
//   offset = layer * layer_stride + kv * kv_stride + block * block_stride
//          + token * token_stride + head * head_stride                   (bytes into the region)
//
// A dim that selects the region (mult != 0) has byte stride 0. Strides of the dims that vary
// inside one region must nest (sorted by stride, each stride >= the previous stride times its
// extent, the smallest >= head_bytes): that is what makes head vectors disjoint.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llumnix_kv/status.h"

namespace llumnix_kv {

// One contiguous piece of memory holding (part of) a KV cache.
struct MemoryRegion {
  uint64_t addr = 0;    // base address; 0 for a description used only for planning
  uint64_t bytes = 0;   // length in bytes
  int32_t device = -1;  // -1: host memory; >= 0: CUDA device ordinal
};

struct KvLayout {
  int32_t num_layers = 0;
  int32_t num_kv = 2;  // 2: separate K and V head vectors; 1: MLA latent (or K-only)
  int32_t num_blocks = 0;
  int32_t block_tokens = 0;  // tokens per block (page)
  int32_t num_heads = 0;     // KV heads held by this cache (a TP shard holds a slice)
  int64_t head_bytes = 0;    // bytes of one head vector
  std::string dtype;         // element type name, e.g. "bfloat16"; "" = unknown

  int64_t region_layer_mult = 0;
  int64_t region_kv_mult = 0;
  int64_t layer_stride = 0;  // bytes
  int64_t kv_stride = 0;     // bytes
  int64_t block_stride = 0;  // bytes
  int64_t token_stride = 0;  // bytes
  int64_t head_stride = 0;   // bytes

  std::vector<MemoryRegion> regions;

  // InvalidLayout if the description is self-inconsistent or head vectors could overlap or leave
  // their region.
  Status Validate() const;

  int64_t RegionOf(int64_t layer, int64_t kv) const {
    return layer * region_layer_mult + kv * region_kv_mult;
  }
  int64_t OffsetOf(int64_t layer, int64_t kv, int64_t block, int64_t token, int64_t head) const {
    return layer * layer_stride + kv * kv_stride + block * block_stride + token * token_stride +
           head * head_stride;
  }
  // Bytes of KV this cache holds for one token (all layers, K and V, all held heads).
  int64_t BytesPerToken() const { return int64_t{num_layers} * num_kv * num_heads * head_bytes; }
  std::string ToString() const;
};

}  // namespace llumnix_kv
