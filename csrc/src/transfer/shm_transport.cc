// shm (same host, other process) and local (same process): one-sided copies by the initiator.
//
// Memory that the peer allocated with TransferEngine::AllocShared lives in a memfd; its key is
// (pid, fd, offset into the memfd, memfd size). The initiator opens /proc/<pid>/fd/<fd>, maps
// the whole memfd once and copies with plain memcpy on the CPU pool: the same bandwidth as a
// copy inside one process, and nothing is left behind in /dev/shm when a process dies. Other
// host memory is reached with process_vm_readv/writev (cross-memory attach), a kernel copy.
// Device memory goes through CUDA IPC: the owner exports the handle of the allocation holding a
// registered region, the peer opens it once and copies on its link's own non-blocking stream:
// one kernel launch for a batch that is device memory on both sides, else one cudaMemcpy a
// segment (CUDA resolves both sides). The local transport is the same link with the peer's
// addresses used as they are.
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "llumnix_kv/copy.h"
#include "transport.h"
#include "wire.h"

namespace llumnix_kv {

// Implemented by the engine: the memfd allocation holding [addr, addr + len), if any.
bool FindSharedAllocation(EngineServices* engine, uint64_t addr, uint64_t len, int* fd,
                          uint64_t* offset, uint64_t* size);

namespace {

// Key of a region: where the peer finds it. offset/size: of the region's start in, and of, the
// memfd allocation or CUDA allocation holding it.
struct ShmKey {
  static constexpr int32_t kCrossMemoryAttach = -1;  // host memory not in a memfd
  static constexpr int32_t kCudaIpc = -2;            // device memory: ipc_handle + device
  int32_t fd = kCrossMemoryAttach;                   // >= 0: the owner's memfd descriptor
  uint64_t offset = 0;
  uint64_t size = 0;
  std::string ipc_handle;
  int32_t device = -1;
};

Status ParseKey(const std::string& blob, ShmKey* key) {
  wire::Reader r(blob);
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&key->fd));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&key->offset));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&key->size));
  if (key->fd != ShmKey::kCudaIpc) return Status::Ok();
  LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&key->ipc_handle, kCudaIpcHandleBytes));
  return r.Get(&key->device);
}

class ShmLink : public Link {
 public:
  ShmLink(const PeerDescriptor& peer, bool identity) : peer_(peer), identity_(identity) {
    worker_ = std::thread([this] { Work(); });
  }
  ~ShmLink() override {
    Close();
    for (auto& [fd, m] : maps_) munmap(m.first, m.second);
    for (auto& [handle, base] : ipc_maps_) (void)CudaIpcClose(base);
  }

  // Maps every region the peer shares with this host once; Translate then finds them in here_.
  Status Map() {
    if (identity_) return Status::Ok();
    for (const RemoteRegion& r : peer_.regions) {
      auto it = r.keys.find("shm");
      if (it == r.keys.end()) continue;
      ShmKey key;
      LLUMNIX_KV_RETURN_IF_ERROR(ParseKey(it->second, &key));
      uint64_t base = 0;  // the peer's allocation holding the region, here
      if (key.fd == ShmKey::kCudaIpc) {
        LLUMNIX_KV_RETURN_IF_ERROR(OpenIpc(key, &base));
      } else if (key.fd >= 0) {
        LLUMNIX_KV_RETURN_IF_ERROR(MapFd(key, &base));
      } else {
        continue;  // reached by cross-memory attach
      }
      here_[r.addr] = {r.len, base + key.offset};
    }
    return Status::Ok();
  }

  Status OpenIpc(const ShmKey& key, uint64_t* base) {
    auto m = ipc_maps_.find(key.ipc_handle);
    if (m == ipc_maps_.end()) {
      uint64_t opened = 0;
      LLUMNIX_KV_RETURN_IF_ERROR(CudaIpcOpen(key.ipc_handle, key.device, &opened));
      m = ipc_maps_.emplace(key.ipc_handle, opened).first;
    }
    *base = m->second;
    return Status::Ok();
  }

  Status MapFd(const ShmKey& key, uint64_t* base) {
    auto m = maps_.find(key.fd);
    if (m == maps_.end()) {
      const std::string path =
          "/proc/" + std::to_string(peer_.pid) + "/fd/" + std::to_string(key.fd);
      const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) {
        return Status(Status::Code::kPeerLost,
                      "cannot open the peer's shared memory " + path + ": " + strerror(errno));
      }
      void* p = mmap(nullptr, key.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
      if (p == MAP_FAILED) return Status::Internal("mmap of peer memory failed");
      m = maps_.emplace(key.fd, std::make_pair(p, key.size)).first;
    }
    *base = reinterpret_cast<uint64_t>(m->second.first);
    return Status::Ok();
  }

  Status Post(const std::shared_ptr<Batch>& batch) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return Status(Status::Code::kPeerLost, "link closed");
    batch->SetParts(1);
    queue_.push_back(batch);
    cv_.notify_one();
    return Status::Ok();
  }
  bool Alive() const override { return !lost_; }
  void Close() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      cv_.notify_all();
    }
    if (worker_.joinable()) worker_.join();
    for (auto& b : queue_) b->PartDone(Status(Status::Code::kPeerLost, "link closed"), 0);
    queue_.clear();
  }

 private:
  void Work() {
    pthread_setname_np(pthread_self(), "lkv-shm");
    while (true) {
      std::shared_ptr<Batch> b;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return closed_ || !queue_.empty(); });
        if (closed_) break;
        b = queue_.front();
        queue_.pop_front();
      }
      if (b->cancelled) {
        b->PartDone(Status(Status::Code::kCancelled, "batch cancelled"), 0);
        continue;
      }
      const Status st = Copy(*b);
      b->PartDone(st, st.ok() ? b->bytes : 0);
    }
    if (stream_ != 0) (void)CudaStreamDestroy(stream_);
  }

  // This worker's CUDA stream on `device` (made current), created on first use.
  Status UseDevice(int32_t device) {
    if (stream_ != 0 && stream_device_ == device) return Status::Ok();
    if (stream_ != 0) (void)CudaStreamDestroy(stream_);
    stream_ = 0;
    LLUMNIX_KV_RETURN_IF_ERROR(CudaStreamCreate(device, &stream_));
    stream_device_ = device;
    return Status::Ok();
  }

  // The peer's address as a pointer here, or 0 if it must go through cross-memory attach.
  uint64_t Translate(uint64_t remote, uint64_t len) const {
    if (identity_) return remote;
    auto it = here_.upper_bound(remote);
    if (it == here_.begin()) return 0;
    --it;
    const auto [region_len, base] = it->second;
    if (remote + len < remote || remote + len > it->first + region_len) return 0;
    return base + (remote - it->first);
  }

  Status Copy(const Batch& b) {
    const bool write = b.op == TransferOp::kWrite;
    if (b.device) {  // CUDA resolves host and device addresses alike (UVA, IPC mappings)
      std::vector<CopyPiece> pieces;
      pieces.reserve(b.segs.size());
      for (const Segment& s : b.segs) {
        const uint64_t remote = Translate(s.remote, s.len);
        if (remote == 0) return Status::Unsupported("device memory of the peer is not mapped");
        pieces.push_back(write ? CopyPiece{s.local, remote, s.len}
                               : CopyPiece{remote, s.local, s.len});
      }
      LLUMNIX_KV_RETURN_IF_ERROR(UseDevice(b.cuda_device));
      return CudaCopyPieces(pieces, b.device_only, stream_);
    }
    std::vector<CopyPiece> pieces;
    std::vector<iovec> local_iov, remote_iov;
    for (const Segment& s : b.segs) {
      const uint64_t remote = Translate(s.remote, s.len);
      if (remote != 0) {
        pieces.push_back(write ? CopyPiece{s.local, remote, s.len}
                               : CopyPiece{remote, s.local, s.len});
      } else {
        local_iov.push_back({reinterpret_cast<void*>(s.local), s.len});
        remote_iov.push_back({reinterpret_cast<void*>(s.remote), s.len});
      }
    }
    CopyPiecesCpu(pieces, 0);
    for (size_t i = 0; i < local_iov.size(); i += IOV_MAX) {
      const size_t n = std::min<size_t>(IOV_MAX, local_iov.size() - i);
      ssize_t want = 0;
      for (size_t k = i; k < i + n; ++k) want += local_iov[k].iov_len;
      const ssize_t got = write
                              ? process_vm_writev(peer_.pid, &local_iov[i], n, &remote_iov[i], n, 0)
                              : process_vm_readv(peer_.pid, &local_iov[i], n, &remote_iov[i], n, 0);
      if (got != want) {
        if (got < 0 && errno == ESRCH) {
          lost_ = true;
          return Status(Status::Code::kPeerLost, "peer process is gone");
        }
        return Status(
            got < 0 && errno == EPERM ? Status::Code::kUnsupported : Status::Code::kInternal,
            std::string("cross-memory attach failed: ") +
                (got < 0 ? strerror(errno) : "partial copy"));
      }
    }
    return Status::Ok();
  }

  const PeerDescriptor peer_;
  const bool identity_;
  std::map<int32_t, std::pair<void*, uint64_t>> maps_;  // peer fd -> (base, size)
  std::map<std::string, uint64_t> ipc_maps_;            // CUDA IPC handle -> base here
  // Each mapped region of the peer: its address there -> (length, its address here).
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> here_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Batch>> queue_;
  bool closed_ = false;
  std::atomic<bool> lost_{false};
  uint64_t stream_ = 0;  // the worker's CUDA stream (a cudaStream_t), 0 until a device batch
  int32_t stream_device_ = -1;
  std::thread worker_;
};

class ShmTransport : public Transport {
 public:
  ShmTransport(EngineServices* engine, bool local) : engine_(engine), local_(local) {}

  std::string Name() const override { return local_ ? "local" : "shm"; }
  std::string Endpoint() const override { return "1"; }

  Status RegisterRegion(const LocalRegion& region, std::string* key) override {
    key->clear();
    if (local_) return Status::Ok();
    wire::Writer w;
    if (region.device >= 0) {
      std::string handle;
      uint64_t offset = 0, size = 0;
      int device = region.device;
      LLUMNIX_KV_RETURN_IF_ERROR(CudaIpcExport(region.addr, &handle, &offset, &size, &device));
      w.Put<int32_t>(ShmKey::kCudaIpc);
      w.Put<uint64_t>(offset);
      w.Put<uint64_t>(size);
      w.PutString(handle);
      w.Put<int32_t>(device);
    } else {
      int fd = ShmKey::kCrossMemoryAttach;
      uint64_t offset = 0, size = 0;
      FindSharedAllocation(engine_, region.addr, region.len, &fd, &offset, &size);
      w.Put<int32_t>(fd);
      w.Put<uint64_t>(offset);
      w.Put<uint64_t>(size);
    }
    *key = std::move(w.str());
    return Status::Ok();
  }

  bool Reaches(const PeerDescriptor& peer) const override {
    if (!peer.endpoints.count(Name())) return false;
    return local_ ? peer.name == engine_->name() || peer.pid == static_cast<uint32_t>(getpid())
                  : peer.host_id == engine_->host_id();
  }
  bool SupportsDevice() const override { return CudaCompiled(); }

  Status Connect(const PeerDescriptor& peer, std::unique_ptr<Link>* link) override {
    auto l = std::make_unique<ShmLink>(peer, local_);
    LLUMNIX_KV_RETURN_IF_ERROR(l->Map());
    *link = std::move(l);
    return Status::Ok();
  }

 private:
  EngineServices* engine_;
  const bool local_;
};

}  // namespace

std::unique_ptr<Transport> MakeShmTransport(EngineServices* engine, bool same_process_only) {
  return std::make_unique<ShmTransport>(engine, same_process_only);
}

}  // namespace llumnix_kv
