// CUDA plan executor: one launch copies every segment of a plan (all layers, both K and V).
// Segments are resolved to absolute addresses on the host and cut into pieces of at most
// kPieceBytes; one warp copies one piece at a time with the widest loads the piece's alignment
// allows (16 bytes when source and destination are 16-byte aligned).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "llumnix_kv/copy.h"

namespace llumnix_kv {
namespace {

struct Piece {
  uint64_t src;
  uint64_t dst;
  uint64_t len;
};

constexpr uint64_t kPieceBytes = 32 << 10;  // 64 iterations of a warp's 512-byte int4 sweep
constexpr int kThreadsPerBlock = 256;
constexpr int kMaxBlocks = 16384;

template <typename T>
__device__ __forceinline__ void WarpCopy(const char* src, char* dst, uint64_t len, int lane) {
  const T* s = reinterpret_cast<const T*>(src);
  T* d = reinterpret_cast<T*>(dst);
  const uint64_t n = len / sizeof(T);
  uint64_t i = lane;
  for (; i + 96 < n; i += 128) {  // four independent loads in flight per lane
    const T a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
    d[i] = a;
    d[i + 32] = b;
    d[i + 64] = c;
    d[i + 96] = e;
  }
  for (; i < n; i += 32) d[i] = s[i];
  for (uint64_t j = n * sizeof(T) + lane; j < len; j += 32) dst[j] = src[j];
}

__global__ void CopyPiecesKernel(const Piece* __restrict__ pieces, int64_t num_pieces) {
  const int lane = threadIdx.x & 31;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
       w < num_pieces; w += num_warps) {
    const Piece p = pieces[w];
    const char* src = reinterpret_cast<const char*>(p.src);
    char* dst = reinterpret_cast<char*>(p.dst);
    const uint64_t align = p.src | p.dst;
    if ((align & 15) == 0) {
      WarpCopy<int4>(src, dst, p.len, lane);
    } else if ((align & 7) == 0) {
      WarpCopy<int2>(src, dst, p.len, lane);
    } else if ((align & 3) == 0) {
      WarpCopy<int>(src, dst, p.len, lane);
    } else {
      WarpCopy<char>(src, dst, p.len, lane);
    }
  }
}

Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::DeviceError(std::string(what) + ": " + cudaGetErrorString(err));
}

cudaStream_t AsStream(uint64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Cuts [src, src + len) -> dst into pieces of at most kPieceBytes.
void AddPieces(uint64_t src, uint64_t dst, uint64_t len, std::vector<Piece>* pieces) {
  for (uint64_t off = 0; off < len; off += kPieceBytes) {
    pieces->push_back({src + off, dst + off, std::min(kPieceBytes, len - off)});
  }
}

// The current device's pool for piece tables, created on first use. It keeps freed memory for
// the next launch: the device's default pool hands it back to the driver at every
// synchronisation, and mapping it again cost about 0.3 ms a launch.
Status PiecePool(cudaMemPool_t* out) {
  static std::mutex mu;
  static auto* pools = new std::map<int, cudaMemPool_t>();  // never freed: used until exit
  int device = 0;
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaGetDevice(&device), "cudaGetDevice"));
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools->find(device);
  if (it == pools->end()) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool;
    LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate"));
    uint64_t keep = UINT64_MAX;
    LLUMNIX_KV_RETURN_IF_ERROR(
        FromCuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
                 "cudaMemPoolSetAttribute"));
    it = pools->emplace(device, pool).first;
  }
  *out = it->second;
  return Status::Ok();
}

// Uploads the piece table and launches one CopyPiecesKernel on `stream`; returns once launched.
Status LaunchPieces(const std::vector<Piece>& pieces, uint64_t stream) {
  if (pieces.empty()) return Status::Ok();
  const cudaStream_t s = AsStream(stream);
  const size_t bytes = pieces.size() * sizeof(Piece);
  cudaMemPool_t pool;
  LLUMNIX_KV_RETURN_IF_ERROR(PiecePool(&pool));
  Piece* device_pieces = nullptr;
  LLUMNIX_KV_RETURN_IF_ERROR(
      FromCuda(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&device_pieces), bytes, pool, s),
               "cudaMallocFromPoolAsync"));
  // From pageable memory this returns once `pieces` has been staged, so it may go out of scope.
  Status st =
      FromCuda(cudaMemcpyAsync(device_pieces, pieces.data(), bytes, cudaMemcpyHostToDevice, s),
               "cudaMemcpyAsync(pieces)");
  if (st.ok()) {
    const int64_t n = static_cast<int64_t>(pieces.size());
    const int warps_per_block = kThreadsPerBlock / 32;
    const int blocks = static_cast<int>(
        std::min<int64_t>((n + warps_per_block - 1) / warps_per_block, kMaxBlocks));
    CopyPiecesKernel<<<blocks, kThreadsPerBlock, 0, s>>>(device_pieces, n);
    st = FromCuda(cudaGetLastError(), "CopyPiecesKernel launch");
  }
  const Status freed = FromCuda(cudaFreeAsync(device_pieces, s), "cudaFreeAsync");
  return st.ok() ? freed : st;
}

}  // namespace

bool CudaCompiled() { return true; }

std::string CudaBuildInfo() {
  return "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10) + ", archs " + LLUMNIX_KV_CUDA_ARCHS;
}

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver (error 35) or no device: clear the sticky error
    return 0;
  }
  return n;
}

Status CopyCuda(const CopyPlan& plan, CopyMode mode, const CopyTarget& target, uint64_t stream) {
  LLUMNIX_KV_RETURN_IF_ERROR(CheckCopyTarget(plan, mode, target));
  std::vector<Piece> pieces;
  pieces.reserve(plan.size());
  for (size_t i = 0; i < plan.size(); ++i) {
    uint64_t src, dst;
    ResolveSegment(plan, i, mode, target, &src, &dst);
    AddPieces(src, dst, static_cast<uint64_t>(plan.len[i]), &pieces);
  }
  return LaunchPieces(pieces, stream);
}

Status CudaMemcpy(uint64_t dst, uint64_t src, uint64_t bytes, uint64_t stream) {
  return FromCuda(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), bytes,
                                  cudaMemcpyDefault, AsStream(stream)),
                  "cudaMemcpyAsync");
}

Status CudaStreamSynchronize(uint64_t stream) {
  return FromCuda(cudaStreamSynchronize(AsStream(stream)), "cudaStreamSynchronize");
}

Status CudaMalloc(uint64_t bytes, int device, uint64_t* ptr) {
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaSetDevice(device), "cudaSetDevice"));
  void* p = nullptr;
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaMalloc(&p, bytes), "cudaMalloc"));
  *ptr = reinterpret_cast<uint64_t>(p);
  return Status::Ok();
}

Status CudaFree(uint64_t ptr) {
  return FromCuda(cudaFree(reinterpret_cast<void*>(ptr)), "cudaFree");
}

Status CudaMemcpyHostDevice(uint64_t dst, uint64_t src, uint64_t bytes) {
  return FromCuda(cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), bytes,
                             cudaMemcpyDefault),
                  "cudaMemcpy");
}

Status CudaCopyPieces(const std::vector<CopyPiece>& pieces, bool device_only, uint64_t stream) {
  if (device_only) {
    std::vector<Piece> split;
    split.reserve(pieces.size());
    for (const CopyPiece& p : pieces) AddPieces(p.src, p.dst, p.len, &split);
    LLUMNIX_KV_RETURN_IF_ERROR(LaunchPieces(split, stream));
  } else {
    for (const CopyPiece& p : pieces) {
      LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(
          cudaMemcpyAsync(reinterpret_cast<void*>(p.dst), reinterpret_cast<const void*>(p.src),
                          p.len, cudaMemcpyDefault, AsStream(stream)),
          "cudaMemcpyAsync"));
    }
  }
  return CudaStreamSynchronize(stream);
}

Status CudaStreamCreate(int device, uint64_t* stream) {
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaSetDevice(device), "cudaSetDevice"));
  cudaStream_t s = nullptr;
  LLUMNIX_KV_RETURN_IF_ERROR(
      FromCuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  *stream = reinterpret_cast<uint64_t>(s);
  return Status::Ok();
}

Status CudaStreamDestroy(uint64_t stream) {
  return FromCuda(cudaStreamDestroy(AsStream(stream)), "cudaStreamDestroy");
}

namespace {

// cuMemGetAddressRange through the runtime's driver entry point: no link against libcuda, so
// the module still imports on machines without a driver.
using GetAddressRange = int (*)(unsigned long long* base, size_t* size, unsigned long long ptr);

Status AllocationOf(uint64_t ptr, uint64_t* base, uint64_t* size) {
  static GetAddressRange fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 3020, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<GetAddressRange>(f);
  }();
  if (fn == nullptr) return Status::Unsupported("cuMemGetAddressRange is not available");
  unsigned long long b = 0;
  size_t n = 0;
  if (fn(&b, &n, ptr) != 0) {
    return Status::InvalidArgument("address " + std::to_string(ptr) +
                                   " is not in a CUDA device allocation");
  }
  *base = b;
  *size = n;
  return Status::Ok();
}

}  // namespace

Status CudaIpcExport(uint64_t ptr, std::string* handle, uint64_t* offset, uint64_t* size,
                     int* device) {
  cudaPointerAttributes attr{};
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr)),
                                      "cudaPointerGetAttributes"));
  if (attr.type != cudaMemoryTypeDevice) {
    return Status::InvalidArgument("CUDA IPC exports device memory only");
  }
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaSetDevice(attr.device), "cudaSetDevice"));
  uint64_t base = 0;
  LLUMNIX_KV_RETURN_IF_ERROR(AllocationOf(ptr, &base, size));
  cudaIpcMemHandle_t h;
  LLUMNIX_KV_RETURN_IF_ERROR(
      FromCuda(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)), "cudaIpcGetMemHandle"));
  handle->assign(reinterpret_cast<const char*>(&h), sizeof(h));
  *offset = ptr - base;
  *device = attr.device;
  return Status::Ok();
}

Status CudaIpcOpen(const std::string& handle, int device, uint64_t* base) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return Status(Status::Code::kBadDescriptor, "CUDA IPC handle has the wrong size");
  }
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaSetDevice(device), "cudaSetDevice"));
  void* p = nullptr;
  LLUMNIX_KV_RETURN_IF_ERROR(FromCuda(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
                                      "cudaIpcOpenMemHandle"));
  *base = reinterpret_cast<uint64_t>(p);
  return Status::Ok();
}

Status CudaIpcClose(uint64_t base) {
  return FromCuda(cudaIpcCloseMemHandle(reinterpret_cast<void*>(base)), "cudaIpcCloseMemHandle");
}

}  // namespace llumnix_kv
