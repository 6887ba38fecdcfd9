#include "llumnix_kv/transfer/engine.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>

#include "batch.h"
#include "transport.h"
#include "wire.h"

namespace llumnix_kv {
namespace {

constexpr uint32_t kDescriptorMagic = 0x44564B4C;  // "LKVD"
constexpr uint16_t kDescriptorVersion = 1;
constexpr uint32_t kMaxEndpoints = 16;
constexpr uint32_t kMaxRegions = 1 << 20;

std::atomic<int64_t> g_live_registrations{0};

std::string ReadHostId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  std::getline(f, boot);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return boot + "/" + host;
}

std::string RandomName() {
  std::random_device rd;
  char buf[32];
  snprintf(buf, sizeof(buf), "kv-%d-%08x", static_cast<int>(getpid()), rd());
  return buf;
}

Status DecodeDescriptor(std::string_view blob, PeerDescriptor* d) {
  wire::Reader r(blob);
  uint32_t magic = 0, n = 0;
  uint16_t version = 0;
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&magic));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&version));
  if (magic != kDescriptorMagic || version != kDescriptorVersion) {
    return Status(Status::Code::kBadDescriptor, "not a llumnix_kv descriptor (or another version)");
  }
  LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&d->name, 1024));
  LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&d->host_id, 1024));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&d->pid));
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&n));
  if (n > kMaxEndpoints) return Status(Status::Code::kBadDescriptor, "too many endpoints");
  for (uint32_t i = 0; i < n; ++i) {
    std::string t, ep;
    LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&t, 64));
    LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&ep, 1 << 16));
    d->endpoints[t] = ep;
  }
  LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&n));
  if (n > kMaxRegions) return Status(Status::Code::kBadDescriptor, "too many regions");
  for (uint32_t i = 0; i < n; ++i) {
    RemoteRegion reg;
    uint32_t nkeys = 0;
    LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&reg.addr));
    LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&reg.len));
    LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&reg.device));
    LLUMNIX_KV_RETURN_IF_ERROR(r.Get(&nkeys));
    if (nkeys > kMaxEndpoints || reg.addr + reg.len < reg.addr) {
      return Status(Status::Code::kBadDescriptor, "malformed region");
    }
    for (uint32_t k = 0; k < nkeys; ++k) {
      std::string t, key;
      LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&t, 64));
      LLUMNIX_KV_RETURN_IF_ERROR(r.GetString(&key, 1 << 16));
      reg.keys[t] = key;
    }
    d->regions.push_back(std::move(reg));
  }
  if (r.left() != 0) return Status(Status::Code::kBadDescriptor, "trailing bytes in descriptor");
  std::sort(d->regions.begin(), d->regions.end(),
            [](const RemoteRegion& a, const RemoteRegion& b) { return a.addr < b.addr; });
  return Status::Ok();
}

struct Peer {
  PeerDescriptor desc;
  std::string transport;                               // default data transport
  std::map<std::string, std::shared_ptr<Link>> links;  // by transport; "tcp" always present
};

struct SharedAllocation {
  int fd;
  uint64_t len;
};

class EngineImpl : public TransferEngine, public EngineServices {
 public:
  explicit EngineImpl(EngineConfig config) : config_(std::move(config)), host_id_(ReadHostId()) {
    if (config_.name.empty()) config_.name = RandomName();
  }
  ~EngineImpl() override { Shutdown(); }

  Status Start() {
    Status st;
    tcp_ = MakeTcpTransport(this, &st);
    if (!tcp_) return st;
    for (const std::string& t : config_.transports) {
      if (t == "local") {
        transports_.push_back(MakeShmTransport(this, true));
      } else if (t == "shm") {
        transports_.push_back(MakeShmTransport(this, false));
      } else if (t == "ucx") {
        auto ucx = MakeUcxTransport(this, &st);
        if (ucx) transports_.push_back(std::move(ucx));
      } else if (t != "tcp") {
        return Status::InvalidArgument("unknown transport '" + t + "'");
      }
    }
    return Status::Ok();
  }

  // EngineServices
  const EngineConfig& config() const override { return config_; }
  const std::string& name() const override { return config_.name; }
  const std::string& host_id() const override { return host_id_; }

  Status CheckLocal(uint64_t addr, uint64_t len, int32_t* device) const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = regions_.upper_bound(addr);
    if (it != regions_.begin()) {
      --it;
      const LocalRegion& r = it->second;
      if (addr >= r.addr && addr + len <= r.addr + r.len && addr + len >= addr) {
        *device = r.device;
        return Status::Ok();
      }
    }
    return Status(Status::Code::kUnregisteredMemory,
                  "[" + std::to_string(addr) + ", +" + std::to_string(len) +
                      ") is not inside memory registered with engine " + config_.name);
  }

  void Deliver(Notification n) override {
    std::lock_guard<std::mutex> lock(notify_mu_);
    notifications_.push_back(std::move(n));
    notify_cv_.notify_all();
  }

  bool FindShared(uint64_t addr, uint64_t len, int* fd, uint64_t* offset, uint64_t* size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = shared_.upper_bound(addr);
    if (it == shared_.begin()) return false;
    --it;
    if (addr + len > it->first + it->second.len) return false;
    *fd = it->second.fd;
    *offset = addr - it->first;
    *size = it->second.len;
    return true;
  }

  // TransferEngine
  std::vector<std::string> transports() const override {
    std::vector<std::string> out;
    for (const auto& t : transports_) out.push_back(t->Name());
    out.push_back("tcp");
    return out;
  }

  std::vector<std::string> device_transports() const override {
    std::vector<std::string> out;
    for (const auto& t : transports_) {
      if (t->SupportsDevice()) out.push_back(t->Name());
    }
    return out;
  }

  Status AllocShared(uint64_t bytes, uint64_t* addr) override {
    if (bytes == 0) return Status::InvalidArgument("cannot allocate 0 bytes");
    const int fd = memfd_create(("llumnix-kv-" + config_.name).c_str(), MFD_CLOEXEC);
    if (fd < 0) return Status::Internal("memfd_create failed");
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      close(fd);
      return Status::Internal("ftruncate of shared memory failed");
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      close(fd);
      return Status::Internal("mmap of shared memory failed");
    }
    std::lock_guard<std::mutex> lock(mu_);
    *addr = reinterpret_cast<uint64_t>(p);
    shared_[*addr] = {fd, bytes};
    return Status::Ok();
  }

  Status FreeShared(uint64_t addr) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = shared_.find(addr);
    if (it == shared_.end()) return Status::InvalidArgument("not a shared allocation");
    for (const auto& [a, r] : regions_) {
      if (a >= addr && a < addr + it->second.len) {
        return Status::InvalidArgument("shared allocation is still registered");
      }
    }
    munmap(reinterpret_cast<void*>(addr), it->second.len);
    close(it->second.fd);
    shared_.erase(it);
    return Status::Ok();
  }

  Status RegisterMemory(uint64_t addr, uint64_t len, int32_t device, uint64_t* handle) override {
    if (addr == 0 || len == 0 || addr + len < addr) {
      return Status::InvalidArgument("cannot register an empty or wrapping range");
    }
    LocalRegion region{0, addr, len, device};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto next = regions_.lower_bound(addr);
      const bool overlaps_next = next != regions_.end() && next->first < addr + len;
      const bool overlaps_prev = next != regions_.begin() &&
                                 std::prev(next)->second.addr + std::prev(next)->second.len > addr;
      if (overlaps_next || overlaps_prev) {
        return Status::InvalidArgument("memory overlaps a registered region");
      }
      region.handle = ++next_handle_;
    }
    std::map<std::string, std::string> keys;
    for (auto& t : transports_) {
      std::string key;
      Status st = t->RegisterRegion(region, &key);
      if (!st.ok()) {
        for (auto& u : transports_) {
          if (keys.count(u->Name())) u->DeregisterRegion(region);
        }
        return st;
      }
      keys[t->Name()] = std::move(key);
    }
    std::lock_guard<std::mutex> lock(mu_);
    regions_[addr] = region;
    region_keys_[addr] = std::move(keys);
    handles_[region.handle] = addr;
    ++g_live_registrations;
    *handle = region.handle;
    return Status::Ok();
  }

  Status DeregisterMemory(uint64_t handle) override {
    LocalRegion region;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto h = handles_.find(handle);
      if (h == handles_.end()) return Status::InvalidArgument("unknown registration handle");
      region = regions_.at(h->second);
      regions_.erase(h->second);
      region_keys_.erase(h->second);
      handles_.erase(h);
      --g_live_registrations;
    }
    for (auto& t : transports_) t->DeregisterRegion(region);
    return Status::Ok();
  }

  size_t NumRegistrations() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return regions_.size();
  }

  std::string Descriptor() const override {
    wire::Writer w;
    w.Put<uint32_t>(kDescriptorMagic);
    w.Put<uint16_t>(kDescriptorVersion);
    w.PutString(config_.name);
    w.PutString(host_id_);
    w.Put<uint32_t>(static_cast<uint32_t>(getpid()));
    w.Put<uint32_t>(static_cast<uint32_t>(transports_.size() + 1));
    for (const auto& t : transports_) {
      w.PutString(t->Name());
      w.PutString(t->Endpoint());
    }
    w.PutString("tcp");
    w.PutString(tcp_->Endpoint());
    std::lock_guard<std::mutex> lock(mu_);
    w.Put<uint32_t>(static_cast<uint32_t>(regions_.size()));
    for (const auto& [addr, r] : regions_) {
      w.Put<uint64_t>(r.addr);
      w.Put<uint64_t>(r.len);
      w.Put<int32_t>(r.device);
      const auto& keys = region_keys_.at(addr);
      w.Put<uint32_t>(static_cast<uint32_t>(keys.size()));
      for (const auto& [t, key] : keys) {
        w.PutString(t);
        w.PutString(key);
      }
    }
    return std::move(w.str());
  }

  Status AddPeer(std::string_view blob, const std::string& transport, uint64_t* id,
                 std::string* chosen) override {
    auto peer = std::make_unique<Peer>();
    LLUMNIX_KV_RETURN_IF_ERROR(DecodeDescriptor(blob, &peer->desc));
    // The control link first: it carries notifications and tells when the peer is gone.
    std::unique_ptr<Link> control;
    LLUMNIX_KV_RETURN_IF_ERROR(tcp_->Connect(peer->desc, &control));
    peer->links["tcp"] = std::move(control);
    peer->transport = "tcp";
    for (auto& t : transports_) {
      if ((transport.empty() || transport == t->Name()) && t->Reaches(peer->desc)) {
        std::unique_ptr<Link> link;
        LLUMNIX_KV_RETURN_IF_ERROR(t->Connect(peer->desc, &link));
        peer->links[t->Name()] = std::move(link);
        peer->transport = t->Name();
        break;
      }
    }
    if (!transport.empty() && peer->transport != transport) {
      peer->links.clear();
      return Status::Unsupported("transport '" + transport + "' cannot reach peer " +
                                 peer->desc.name);
    }
    *chosen = peer->transport;
    std::lock_guard<std::mutex> lock(mu_);
    *id = ++next_peer_;
    peers_[*id] = std::move(peer);
    return Status::Ok();
  }

  Status RemovePeer(uint64_t id) override {
    std::unique_ptr<Peer> peer;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = peers_.find(id);
      if (it == peers_.end()) return Status::InvalidArgument("unknown peer");
      peer = std::move(it->second);
      peers_.erase(it);
    }
    for (auto& [name, link] : peer->links) link->Close();
    return Status::Ok();
  }

  Status PeerName(uint64_t id, std::string* name) const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(id);
    if (it == peers_.end()) return Status::InvalidArgument("unknown peer");
    *name = it->second->desc.name;
    return Status::Ok();
  }

  Status Submit(uint64_t peer_id, TransferOp op, std::vector<Segment> segs,
                const SubmitOptions& opts, uint64_t* id) override {
    if (op != TransferOp::kWrite && op != TransferOp::kRead) {
      return Status::InvalidArgument("op must be WRITE or READ");
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto pit = peers_.find(peer_id);
    if (pit == peers_.end()) return Status::InvalidArgument("unknown peer");
    Peer& peer = *pit->second;
    const std::string tname = opts.transport.empty() ? peer.transport : opts.transport;
    auto lit = peer.links.find(tname);
    if (lit == peer.links.end()) {
      return Status::Unsupported("peer " + peer.desc.name + " has no '" + tname + "' link");
    }
    const std::shared_ptr<Link>& control = peer.links.at("tcp");
    const std::shared_ptr<Link>& link = lit->second;
    if (!control->Alive() || !link->Alive()) {
      return Status(Status::Code::kPeerLost, "peer " + peer.desc.name + " is gone");
    }
    bool device = false, device_only = !segs.empty();
    int32_t cuda_device = -1;
    for (const Segment& s : segs) {
      int32_t dev = -1;
      auto r = regions_.upper_bound(s.local);
      if (r == regions_.begin() || s.local + s.len < s.local ||
          s.local + s.len > std::prev(r)->second.addr + std::prev(r)->second.len) {
        return Status(Status::Code::kUnregisteredMemory,
                      "local segment is not inside registered memory");
      }
      dev = std::prev(r)->second.device;
      const RemoteRegion* remote = peer.desc.Find(s.remote, s.len);
      if (remote == nullptr) {
        return Status(Status::Code::kUnregisteredMemory,
                      "remote segment is not inside memory peer " + peer.desc.name + " registered");
      }
      device = device || dev >= 0 || remote->device >= 0;
      device_only = device_only && dev >= 0 && remote->device >= 0;
      if (cuda_device < 0) cuda_device = dev >= 0 ? dev : remote->device;
    }
    if (device && !TransportSupportsDevice(tname)) {
      return Status::Unsupported("transport '" + tname + "' cannot move CUDA device memory");
    }
    if (opts.mode != "auto" && opts.mode != "direct" && opts.mode != "staged") {
      return Status::InvalidArgument("mode must be auto, direct or staged, not '" + opts.mode +
                                     "'");
    }
    const size_t nsegs = segs.size();
    auto batch = std::make_shared<Batch>(++next_batch_, op, std::move(segs), opts);
    batch->staged = opts.mode == "staged" || (opts.mode == "auto" && nsegs > 0 &&
                                              batch->bytes / nsegs < config_.staged_below_bytes);
    batch->transport = tname;
    batch->device = device;
    batch->device_only = device_only;
    batch->cuda_device = cuda_device;
    // Weak references: a batch may outlive its peer (RemovePeer), and then counts as lost.
    std::weak_ptr<Link> weak_control = control, weak_link = link;
    batch->peer_alive = [weak_control] {
      const std::shared_ptr<Link> c = weak_control.lock();
      return c && c->Alive();
    };
    batch->on_success = [weak_link, weak_control](Batch& b) -> Status {
      const std::shared_ptr<Link> c = weak_control.lock(), l = weak_link.lock();
      if (!c || !l || !c->Alive()) {
        return Status(Status::Code::kPeerLost,
                      "peer went away during batch " + std::to_string(b.id));
      }
      if (b.opts.notify.empty()) return Status::Ok();
      Status st = l->Notify(b.opts.notify);
      return st.code() == Status::Code::kUnsupported ? c->Notify(b.opts.notify) : st;
    };
    LLUMNIX_KV_RETURN_IF_ERROR(link->Post(batch));
    batches_[batch->id] = batch;
    *id = batch->id;
    return Status::Ok();
  }

  Status Poll(uint64_t id, BatchStatus* out) override {
    std::shared_ptr<Batch> b;
    LLUMNIX_KV_RETURN_IF_ERROR(GetBatch(id, &b));
    Status st;
    *out = b->Snapshot(&st);
    return st;
  }

  Status Wait(uint64_t id, double timeout_s, BatchStatus* out) override {
    std::shared_ptr<Batch> b;
    LLUMNIX_KV_RETURN_IF_ERROR(GetBatch(id, &b));
    Status st;
    const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(std::max(0.0, timeout_s)));
    *out = b->WaitUntil(until, &st);
    if (st.ok() && out->state == BatchState::kPending) {
      return Status(Status::Code::kTimeout, "batch " + std::to_string(id) +
                                                " still pending after " +
                                                std::to_string(timeout_s) + " s");
    }
    return st;
  }

  Status Cancel(uint64_t id) override {
    std::shared_ptr<Batch> b;
    LLUMNIX_KV_RETURN_IF_ERROR(GetBatch(id, &b));
    b->cancelled = true;
    b->Fail(Status(Status::Code::kCancelled, "batch " + std::to_string(id) + " cancelled"));
    return Status::Ok();
  }

  Status Release(uint64_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (batches_.erase(id) == 0) return Status::InvalidArgument("unknown batch");
    return Status::Ok();
  }

  std::vector<Notification> TakeNotifications() override {
    std::lock_guard<std::mutex> lock(notify_mu_);
    std::vector<Notification> out(std::make_move_iterator(notifications_.begin()),
                                  std::make_move_iterator(notifications_.end()));
    notifications_.clear();
    return out;
  }

  Status WaitNotifications(double timeout_s, std::vector<Notification>* out) override {
    std::unique_lock<std::mutex> lock(notify_mu_);
    const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(std::max(0.0, timeout_s)));
    notify_cv_.wait_until(lock, until, [this] { return !notifications_.empty(); });
    if (notifications_.empty()) {
      return Status(Status::Code::kTimeout,
                    "no notification within " + std::to_string(timeout_s) + " s");
    }
    out->assign(std::make_move_iterator(notifications_.begin()),
                std::make_move_iterator(notifications_.end()));
    notifications_.clear();
    return Status::Ok();
  }

  void Shutdown() override {
    std::map<uint64_t, std::unique_ptr<Peer>> peers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shut_down_) return;
      shut_down_ = true;
      peers.swap(peers_);
    }
    for (auto& [id, peer] : peers) {
      for (auto& [name, link] : peer->links) link->Close();
    }
    peers.clear();
    if (tcp_) tcp_->Shutdown();
    std::vector<uint64_t> handles;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [h, addr] : handles_) handles.push_back(h);
    }
    for (uint64_t h : handles) DeregisterMemory(h);
    for (auto& t : transports_) t->Shutdown();
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [addr, alloc] : shared_) {
      munmap(reinterpret_cast<void*>(addr), alloc.len);
      close(alloc.fd);
    }
    shared_.clear();
    batches_.clear();
  }

 private:
  Status GetBatch(uint64_t id, std::shared_ptr<Batch>* b) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = batches_.find(id);
    if (it == batches_.end()) return Status::InvalidArgument("unknown batch " + std::to_string(id));
    *b = it->second;
    return Status::Ok();
  }

  bool TransportSupportsDevice(const std::string& name) const {
    for (const auto& t : transports_) {
      if (t->Name() == name) return t->SupportsDevice();
    }
    return false;
  }

  EngineConfig config_;
  const std::string host_id_;
  std::unique_ptr<Transport> tcp_;
  std::vector<std::unique_ptr<Transport>> transports_;  // besides tcp, best first

  mutable std::mutex mu_;
  bool shut_down_ = false;
  std::map<uint64_t, LocalRegion> regions_;  // by addr
  std::map<uint64_t, std::map<std::string, std::string>> region_keys_;
  std::map<uint64_t, uint64_t> handles_;  // handle -> addr
  std::map<uint64_t, SharedAllocation> shared_;
  std::map<uint64_t, std::unique_ptr<Peer>> peers_;
  std::map<uint64_t, std::shared_ptr<Batch>> batches_;
  uint64_t next_handle_ = 0;
  uint64_t next_peer_ = 0;
  uint64_t next_batch_ = 0;

  std::mutex notify_mu_;
  std::condition_variable notify_cv_;
  std::deque<Notification> notifications_;
};

}  // namespace

const RemoteRegion* PeerDescriptor::Find(uint64_t addr, uint64_t len) const {
  auto it = std::upper_bound(regions.begin(), regions.end(), addr,
                             [](uint64_t a, const RemoteRegion& r) { return a < r.addr; });
  if (it == regions.begin()) return nullptr;
  --it;
  if (addr + len < addr || addr + len > it->addr + it->len) return nullptr;
  return &*it;
}

bool FindSharedAllocation(EngineServices* engine, uint64_t addr, uint64_t len, int* fd,
                          uint64_t* offset, uint64_t* size) {
  return static_cast<EngineImpl*>(engine)->FindShared(addr, len, fd, offset, size);
}

Status TransferEngine::Create(const EngineConfig& config, std::unique_ptr<TransferEngine>* out) {
  auto engine = std::make_unique<EngineImpl>(config);
  LLUMNIX_KV_RETURN_IF_ERROR(engine->Start());
  *out = std::move(engine);
  return Status::Ok();
}

int64_t TransferEngine::LiveRegistrations() { return g_live_registrations.load(); }

}  // namespace llumnix_kv
