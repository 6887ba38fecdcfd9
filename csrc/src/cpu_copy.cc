#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "llumnix_kv/copy.h"
#include "thread_pool.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llumnix_kv {
namespace {

// Below this many bytes per thread, waking another thread costs more than it saves.
constexpr int64_t kMinBytesPerThread = 256 << 10;

std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;  // a copy in flight keeps its pool alive
int g_pool_threads = 0;

int DefaultThreads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hw == 0 ? 1u : hw, 1u, 8u));
}

std::shared_ptr<ThreadPool> Pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) {
    if (g_pool_threads <= 0) g_pool_threads = DefaultThreads();
    g_pool = std::make_shared<ThreadPool>(g_pool_threads);
  }
  return g_pool;
}

// Below this, memcpy as it is.
constexpr size_t kVectorCopyMin = 4 << 10;

// Streams at least this long (the last-level cache, at most 64 MiB) are written with
// non-temporal stores: they cannot stay in that cache anyway, and bypassing it saves reading
// every destination line first.
int64_t NonTemporalBytes() {
  static const int64_t bytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return std::min(l3 > 0 ? static_cast<int64_t>(l3) : int64_t{32} << 20, int64_t{64} << 20);
  }();
  return bytes;
}

// memcpy, except that copies of kVectorCopyMin bytes or more run an explicit 16-byte vector loop
// with aligned stores. glibc's memcpy takes `rep movsb` for mid-sized copies (up to the L2 size
// on AMD), which runs at half speed when source and destination differ modulo 64 (a numpy buffer
// sits 16 bytes past a page boundary). On the 2-core CI machine, `llumnix-kv bench --section
// blocks --transport shm` READ of 256 KiB blocks went from 0.82 to 1.26 of the memcpy ceiling.
void CopyBytes(void* dst, const void* src, size_t n, bool non_temporal) {
#if defined(__SSE2__)
  if (n >= kVectorCopyMin) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    const size_t head = (64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
      auto* out = reinterpret_cast<__m128i*>(d);
      if (non_temporal) {
        _mm_stream_si128(out, a);
        _mm_stream_si128(out + 1, b);
        _mm_stream_si128(out + 2, c);
        _mm_stream_si128(out + 3, e);
      } else {
        _mm_store_si128(out, a);
        _mm_store_si128(out + 1, b);
        _mm_store_si128(out + 2, c);
        _mm_store_si128(out + 3, e);
      }
    }
    if (non_temporal) _mm_sfence();  // ordered before whatever reports the copy done
    std::memcpy(d, s, n);
    return;
  }
#endif
  (void)non_temporal;
  std::memcpy(dst, src, n);
}

// Copies bytes [begin, end) of a packed byte stream of n pieces, piece i starting at
// offsets[i] (offsets has n + 1 entries); resolve(i, &src, &dst) gives piece i's addresses.
template <typename Resolve>
void CopyByteRange(const std::vector<int64_t>& offsets, int64_t begin, int64_t end,
                   const Resolve& resolve) {
  const bool non_temporal = offsets.back() >= NonTemporalBytes();
  size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  for (int64_t pos = begin; pos < end; ++i) {
    uint64_t src, dst;
    resolve(i, &src, &dst);
    const int64_t skip = pos - offsets[i];
    const int64_t n = std::min(offsets[i + 1], end) - pos;
    CopyBytes(reinterpret_cast<void*>(dst + skip), reinterpret_cast<const void*>(src + skip), n,
              non_temporal);
    pos += n;
  }
}

// Copies the whole stream on up to num_threads pool threads (<= 0: the pool size).
template <typename Resolve>
void CopyStream(const std::vector<int64_t>& offsets, int num_threads, const Resolve& resolve) {
  const int64_t total = offsets.back();
  if (total == 0) return;
  const std::shared_ptr<ThreadPool> pool = Pool();
  int n = num_threads <= 0 ? pool->size() : std::min(num_threads, pool->size());
  n = static_cast<int>(std::clamp<int64_t>(total / kMinBytesPerThread, 1, n));
  if (n == 1) {
    CopyByteRange(offsets, 0, total, resolve);
    return;
  }
  // Threads claim pieces from a shared counter instead of taking fixed shares, so a thread that
  // is descheduled (a busy machine) delays the copy by one piece, not by its whole share.
  const int64_t piece = std::max<int64_t>(kMinBytesPerThread, total / (int64_t{n} * 16));
  const int64_t pieces = (total + piece - 1) / piece;
  std::atomic<int64_t> next{0};
  pool->Run(n, [&](int) {
    for (int64_t p = next.fetch_add(1); p < pieces; p = next.fetch_add(1)) {
      CopyByteRange(offsets, p * piece, std::min(total, (p + 1) * piece), resolve);
    }
  });
}

}  // namespace

Status CheckCopyTarget(const CopyPlan& plan, CopyMode mode, const CopyTarget& target) {
  if (mode != CopyMode::kScatter && target.src_bases == nullptr && plan.size() > 0) {
    return Status::InvalidArgument("source region bases are missing");
  }
  if (mode != CopyMode::kGather && target.dst_bases == nullptr && plan.size() > 0) {
    return Status::InvalidArgument("destination region bases are missing");
  }
  if (mode != CopyMode::kDirect &&
      (target.staging == 0 || target.staging_bytes < static_cast<uint64_t>(plan.total_bytes()))) {
    return Status::InvalidArgument("staging buffer of " + std::to_string(target.staging_bytes) +
                                   " bytes cannot hold the plan's " +
                                   std::to_string(plan.total_bytes()) + " bytes");
  }
  for (size_t i = 0; i < plan.size(); ++i) {
    if ((mode != CopyMode::kScatter &&
         static_cast<size_t>(plan.src_region[i]) >= target.num_src_regions) ||
        (mode != CopyMode::kGather &&
         static_cast<size_t>(plan.dst_region[i]) >= target.num_dst_regions)) {
      return Status::OutOfRange("plan segment " + std::to_string(i) +
                                " names a region that the target does not have");
    }
  }
  return Status::Ok();
}

Status CopyCpu(const CopyPlan& plan, CopyMode mode, const CopyTarget& target, int num_threads) {
  LLUMNIX_KV_RETURN_IF_ERROR(CheckCopyTarget(plan, mode, target));
  CopyStream(plan.staging_off, num_threads, [&](size_t i, uint64_t* src, uint64_t* dst) {
    ResolveSegment(plan, i, mode, target, src, dst);
  });
  return Status::Ok();
}

void CopyPiecesCpu(const std::vector<CopyPiece>& pieces, int num_threads) {
  std::vector<int64_t> offsets(pieces.size() + 1, 0);
  for (size_t i = 0; i < pieces.size(); ++i) offsets[i + 1] = offsets[i] + pieces[i].len;
  CopyStream(offsets, num_threads, [&](size_t i, uint64_t* src, uint64_t* dst) {
    *src = pieces[i].src;
    *dst = pieces[i].dst;
  });
}

void SetCpuThreads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool_threads = n <= 0 ? DefaultThreads() : n;
  g_pool.reset();
}

int CpuThreads() { return Pool()->size(); }

}  // namespace llumnix_kv
