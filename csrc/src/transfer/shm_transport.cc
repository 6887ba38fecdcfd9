// shm (same host, other process) and local (same process): one-sided copies by the initiator.
//
// Memory that the peer allocated with TransferEngine::AllocShared lives in a memfd; its key is
// (pid, fd, offset into the memfd, memfd size). The initiator opens /proc/<pid>/fd/<fd>, maps
// the whole memfd once and copies with plain memcpy on the CPU pool: the same bandwidth as a
// copy inside one process, and nothing is left behind in /dev/shm when a process dies. Other
// host memory is reached with process_vm_readv/writev (cross-memory attach), a kernel copy.
// The local transport is the same link with the peer's addresses used as they are.
#include <fcntl.h>
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

struct ShmKey {
  int32_t fd = -1;  // -1: not shared memory, use cross-memory attach
  uint64_t offset = 0;
  uint64_t size = 0;
};

Status ParseKey(const std::string& blob, ShmKey* key) {
  wire::Reader r(blob);
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&key->fd));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&key->offset));
  return r.Get(&key->size);
}

class ShmLink : public Link {
 public:
  ShmLink(const PeerDescriptor& peer, bool identity) : peer_(peer), identity_(identity) {
    worker_ = std::thread([this] { Work(); });
  }
  ~ShmLink() override {
    Close();
    for (auto& [fd, m] : maps_) munmap(m.first, m.second);
  }

  Status Map() {
    if (identity_) return Status::Ok();
    for (const RemoteRegion& r : peer_.regions) {
      auto it = r.keys.find("shm");
      if (it == r.keys.end()) continue;
      ShmKey key;
      LLUMNIX_KV_RETURN_IF_ERROR(ParseKey(it->second, &key));
      if (key.fd < 0 || maps_.count(key.fd)) continue;
      const std::string path =
          "/proc/" + std::to_string(peer_.pid) + "/fd/" + std::to_string(key.fd);
      const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) {
        return Status(Status::Code::kPeerLost,
                      "cannot open the peer's shared memory " + path + ": " + strerror(errno));
      }
      void* base = mmap(nullptr, key.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
      if (base == MAP_FAILED) return Status::Internal("mmap of peer memory failed");
      maps_[key.fd] = {base, key.size};
    }
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
    while (true) {
      std::shared_ptr<Batch> b;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return closed_ || !queue_.empty(); });
        if (closed_) return;
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
  }

  // The peer's address as a pointer here, or 0 if it must go through cross-memory attach.
  uint64_t Translate(uint64_t remote, uint64_t len) const {
    if (identity_) return remote;
    const RemoteRegion* r = peer_.Find(remote, len);
    if (r == nullptr) return 0;
    auto it = r->keys.find("shm");
    ShmKey key;
    if (it == r->keys.end() || !ParseKey(it->second, &key).ok() || key.fd < 0) return 0;
    auto m = maps_.find(key.fd);
    if (m == maps_.end()) return 0;
    return reinterpret_cast<uint64_t>(m->second.first) + key.offset + (remote - r->addr);
  }

  Status Copy(const Batch& b) {
    const bool write = b.op == TransferOp::kWrite;
    if (b.device) {  // local transport only (SupportsDevice): CUDA resolves both sides
      for (const Segment& s : b.segs) {
        LLUMNIX_KV_RETURN_IF_ERROR(write ? CudaMemcpy(s.remote, s.local, s.len, 0)
                                         : CudaMemcpy(s.local, s.remote, s.len, 0));
      }
      return CudaStreamSynchronize(0);
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
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Batch>> queue_;
  bool closed_ = false;
  std::atomic<bool> lost_{false};
  std::thread worker_;
};

class ShmTransport : public Transport {
 public:
  ShmTransport(EngineServices* engine, bool local) : engine_(engine), local_(local) {}

  std::string Name() const override { return local_ ? "local" : "shm"; }
  std::string Endpoint() const override { return "1"; }

  Status RegisterRegion(const LocalRegion& region, std::string* key) override {
    key->clear();
    if (local_ || region.device >= 0) return Status::Ok();
    wire::Writer w;
    int fd = -1;
    uint64_t offset = 0, size = 0;
    if (FindSharedAllocation(engine_, region.addr, region.len, &fd, &offset, &size)) {
      w.Put<int32_t>(fd);
      w.Put<uint64_t>(offset);
      w.Put<uint64_t>(size);
    } else {
      w.Put<int32_t>(-1);
      w.Put<uint64_t>(0);
      w.Put<uint64_t>(0);
    }
    *key = std::move(w.str());
    return Status::Ok();
  }

  bool Reaches(const PeerDescriptor& peer) const override {
    if (!peer.endpoints.count(Name())) return false;
    return local_ ? peer.name == engine_->name() || peer.pid == static_cast<uint32_t>(getpid())
                  : peer.host_id == engine_->host_id();
  }
  bool SupportsDevice() const override { return local_ && CudaCompiled(); }

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
