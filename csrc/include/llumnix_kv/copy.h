// Plan executors. The CPU and CUDA executors have one semantics:
//   direct:  region -> region           dst_base[dst_region[i]] + dst_off[i] <- src_base[...] +
//   src_off[i] gather:  region -> staging buffer   staging + staging_off[i]           <-
//   src_base[...] + src_off[i] scatter: staging buffer -> region   dst_base[...] + dst_off[i] <-
//   staging + staging_off[i]
// for i in [0, plan.size()), len[i] bytes each. Bases are addresses indexed by region.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "llumnix_kv/plan.h"
#include "llumnix_kv/status.h"

namespace llumnix_kv {

enum class CopyMode : int { kDirect = 0, kGather = 1, kScatter = 2 };

struct CopyTarget {
  const uint64_t* src_bases = nullptr;  // [num_src_regions] region base addresses
  size_t num_src_regions = 0;
  const uint64_t* dst_bases = nullptr;  // [num_dst_regions]
  size_t num_dst_regions = 0;
  uint64_t staging = 0;  // staging buffer for gather/scatter
  uint64_t staging_bytes = 0;
};

// Checks region indices and the staging size against `plan` (no memory is touched).
Status CheckCopyTarget(const CopyPlan& plan, CopyMode mode, const CopyTarget& target);

// Resolves segment i to (source address, destination address) for `mode`.
inline void ResolveSegment(const CopyPlan& plan, size_t i, CopyMode mode, const CopyTarget& t,
                           uint64_t* src, uint64_t* dst) {
  *src = mode == CopyMode::kScatter ? t.staging + plan.staging_off[i]
                                    : t.src_bases[plan.src_region[i]] + plan.src_off[i];
  *dst = mode == CopyMode::kGather ? t.staging + plan.staging_off[i]
                                   : t.dst_bases[plan.dst_region[i]] + plan.dst_off[i];
}

// Host memory: splits the plan's bytes evenly over up to `num_threads` threads of the process
// pool (<= 0: the pool size). Blocks until done; safe to call without the GIL.
Status CopyCpu(const CopyPlan& plan, CopyMode mode, const CopyTarget& target, int num_threads);

// Host memory: copies plain pieces (src, dst, len) with the same thread pool and splitting.
struct CopyPiece {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t len = 0;
};
void CopyPiecesCpu(const std::vector<CopyPiece>& pieces, int num_threads);

// Threads of the CPU pool (default: hardware concurrency, at most 8).
void SetCpuThreads(int n);
int CpuThreads();

// CUDA (device or mapped/pinned host memory): one kernel launch for the whole plan, ordered on
// `stream` (a cudaStream_t as an integer; 0 = legacy default stream). Returns once launched.
Status CopyCuda(const CopyPlan& plan, CopyMode mode, const CopyTarget& target, uint64_t stream);

bool CudaCompiled();
// "CUDA <runtime version>, archs <list>" when compiled in, else "".
std::string CudaBuildInfo();
// Devices usable now; 0 without CUDA support, without a driver or without a device.
int CudaDeviceCount();
// Benchmark baseline and test helpers.
Status CudaMemcpy(uint64_t dst, uint64_t src, uint64_t bytes, uint64_t stream);
Status CudaStreamSynchronize(uint64_t stream);
Status CudaMalloc(uint64_t bytes, int device, uint64_t* ptr);
Status CudaFree(uint64_t ptr);
Status CudaMemcpyHostDevice(uint64_t dst, uint64_t src, uint64_t bytes);  // synchronous, any way

// Copies pieces on `stream` (of the current device) and waits for them. With `device_only`
// (every source and destination is memory the device addresses: its own, or another process's
// opened by CUDA IPC) one kernel launch moves them all; otherwise each piece is one
// cudaMemcpyAsync (cudaMemcpyDefault: host memory may be pageable).
Status CudaCopyPieces(const std::vector<CopyPiece>& pieces, bool device_only, uint64_t stream);

// A stream on `device` that does not synchronise with the legacy default stream (so transfers
// never wait for, or hold up, an inference engine's work there); makes `device` current.
Status CudaStreamCreate(int device, uint64_t* stream);
Status CudaStreamDestroy(uint64_t stream);

// CUDA IPC, the shm transport's path for device memory. Export gives the IPC handle of the device
// allocation holding `ptr` (kCudaIpcHandleBytes bytes), that allocation's size, the offset of
// `ptr` in it and its device; a peer process opens the handle once and addresses the allocation
// from the returned base.
constexpr size_t kCudaIpcHandleBytes = 64;
Status CudaIpcExport(uint64_t ptr, std::string* handle, uint64_t* offset, uint64_t* size,
                     int* device);
Status CudaIpcOpen(const std::string& handle, int device, uint64_t* base);
Status CudaIpcClose(uint64_t base);

}  // namespace llumnix_kv
