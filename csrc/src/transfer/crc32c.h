// CRC32C (Castagnoli) with the SSE4.2 instruction where the CPU has it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llumnix_kv {

// Extends `crc` (start with 0) over `n` bytes at `data`.
uint32_t Crc32c(uint32_t crc, const void* data, size_t n);

}  // namespace llumnix_kv
