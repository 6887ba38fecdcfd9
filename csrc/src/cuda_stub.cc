// Built instead of cuda/cuda_copy.cu when the module is compiled without CUDA.
#include "llumnix_kv/copy.h"

namespace llumnix_kv {
namespace {
Status NoCuda() { return Status::Unsupported("llumnix_kv was built without CUDA support"); }
}  // namespace

bool CudaCompiled() { return false; }
std::string CudaBuildInfo() { return ""; }
int CudaDeviceCount() { return 0; }
Status CopyCuda(const CopyPlan&, CopyMode, const CopyTarget&, uint64_t) { return NoCuda(); }
Status CudaMemcpy(uint64_t, uint64_t, uint64_t, uint64_t) { return NoCuda(); }
Status CudaStreamSynchronize(uint64_t) { return NoCuda(); }
Status CudaMalloc(uint64_t, int, uint64_t*) { return NoCuda(); }
Status CudaFree(uint64_t) { return NoCuda(); }
Status CudaMemcpyHostDevice(uint64_t, uint64_t, uint64_t) { return NoCuda(); }
Status CudaCopyPieces(const std::vector<CopyPiece>&, bool, uint64_t) { return NoCuda(); }
Status CudaStreamCreate(int, uint64_t*) { return NoCuda(); }
Status CudaStreamDestroy(uint64_t) { return NoCuda(); }
Status CudaIpcExport(uint64_t, std::string*, uint64_t*, uint64_t*, int*) { return NoCuda(); }
Status CudaIpcOpen(const std::string&, int, uint64_t*) { return NoCuda(); }
Status CudaIpcClose(uint64_t) { return NoCuda(); }

}  // namespace llumnix_kv
