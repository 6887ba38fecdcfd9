// tcp: the built-in transport, always available, and every engine's control channel.
//
// Each engine listens on one TCP port. A link to a peer is `tcp_streams` connections; a batch
// is split by bytes across them. Messages (little-endian, see Header):
//   HELLO     name                               first message of every connection
//   WRITE     n x {addr, len}, payload[, crc]    -> ACK{status}
//   READ_REQ  n x {addr, len}                    -> READ_RESP{status}, payload[, crc]
//   NOTIFY    message                            delivered to the receiving engine
// The receiver checks every address against its registered memory before touching it, then
// receives the payload straight into place with scatter reads (recvmsg over iovecs). Parts of
// small segments (under kPackBelow on average, e.g. the per-token head slices of a TP1 -> TP2
// transfer) are flagged PACKED: their payload goes through a cache-sized bounce buffer on both
// ends, as the kernel's per-iovec cost outweighs two copies that stay in cache. A connection
// processes messages in order, so responses match requests first-in first-out.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "socket_io.h"
#include "transport.h"

namespace llumnix_kv {
namespace {

constexpr uint32_t kMagic = 0x4D564B4C;  // "LKVM"
enum MsgType : uint8_t {
  kHello = 1,
  kWrite = 2,
  kAck = 3,
  kReadReq = 4,
  kReadResp = 5,
  kNotify = 6
};
constexpr uint8_t kFlagCrc = 1;
constexpr uint8_t kFlagPacked = 2;
constexpr uint64_t kPackBelow = 768;        // parts of smaller segments (on average) are packed
constexpr size_t kBounceBytes = 256 << 10;  // bounce buffer: stays in a core's L2
constexpr uint64_t kMaxSegments = uint64_t{1} << 24;
constexpr uint64_t kMaxString = uint64_t{1} << 20;
constexpr uint64_t kSplitBytes = 1 << 20;  // smaller batches travel on one stream

struct Header {
  uint32_t magic = kMagic;
  uint8_t type = 0;
  uint8_t flags = 0;
  uint16_t pad = 0;
  uint32_t part = 0;
  uint32_t status = 0;  // Status::Code of a response
  uint64_t batch = 0;
  uint64_t count = 0;  // segments, or bytes of a string
  uint64_t bytes = 0;  // payload bytes
};
static_assert(sizeof(Header) == 40, "wire header is 40 bytes");

struct WireSeg {
  uint64_t addr;
  uint64_t len;
};

Status Protocol(const std::string& what) {
  return Status(Status::Code::kBadDescriptor, "protocol error: " + what);
}

Status SendMessage(int fd, const Header& h, const void* body, size_t body_len) {
  std::vector<iovec> iov{{const_cast<Header*>(&h), sizeof(h)}};
  if (body_len > 0) iov.push_back({const_cast<void*>(body), body_len});
  return net::SendAll(fd, iov);
}

Status RecvString(int fd, uint64_t n, std::string* s) {
  if (n > kMaxString) return Protocol("string of " + std::to_string(n) + " bytes");
  s->resize(n);
  return net::RecvAll(fd, s->data(), n);
}

Status RecvTable(int fd, const Header& h, std::vector<WireSeg>* table) {
  if (h.count > kMaxSegments) return Protocol("too many segments");
  table->resize(h.count);
  LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd, table->data(), h.count * sizeof(WireSeg)));
  uint64_t total = 0;
  for (const WireSeg& s : *table) total += s.len;
  if (total != h.bytes) return Protocol("segment lengths do not add up to the payload");
  return Status::Ok();
}

// Receives the payload straight into its (addr, len) pieces, in order.
Status RecvPayload(int fd, const std::vector<WireSeg>& segs) {
  std::vector<iovec> iov;
  iov.reserve(segs.size());
  for (const WireSeg& s : segs) iov.push_back({reinterpret_cast<void*>(s.addr), s.len});
  return net::RecvAllIov(fd, iov);
}

bool Packed(uint64_t bytes, size_t segments) {
  return segments > 1 && bytes < kPackBelow * segments;
}

// Sends the bytes of `segs` gathered, a bounce buffer at a time.
Status SendPacked(int fd, const std::vector<WireSeg>& segs, std::vector<char>* bounce) {
  bounce->resize(kBounceBytes);
  size_t fill = 0;
  for (const WireSeg& s : segs) {
    for (uint64_t off = 0; off < s.len;) {
      const size_t n = std::min<uint64_t>(s.len - off, kBounceBytes - fill);
      std::memcpy(bounce->data() + fill, reinterpret_cast<const char*>(s.addr) + off, n);
      fill += n;
      off += n;
      if (fill == kBounceBytes) {
        std::vector<iovec> iov{{bounce->data(), fill}};
        LLUMNIX_KV_RETURN_IF_ERROR(net::SendAll(fd, iov));
        fill = 0;
      }
    }
  }
  std::vector<iovec> iov{{bounce->data(), fill}};
  return fill > 0 ? net::SendAll(fd, iov) : Status::Ok();
}

// Receives the bytes of `segs` (sent by SendPacked), a bounce buffer at a time, into place.
Status RecvPacked(int fd, const std::vector<WireSeg>& segs, std::vector<char>* bounce) {
  bounce->resize(kBounceBytes);
  size_t seg = 0;
  uint64_t off = 0, left = 0;
  for (const WireSeg& s : segs) left += s.len;
  while (left > 0) {
    const size_t chunk = std::min<uint64_t>(left, kBounceBytes);
    LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd, bounce->data(), chunk));
    for (size_t pos = 0; pos < chunk;) {
      const size_t n = std::min<uint64_t>(segs[seg].len - off, chunk - pos);
      std::memcpy(reinterpret_cast<char*>(segs[seg].addr) + off, bounce->data() + pos, n);
      pos += n;
      off += n;
      if (off == segs[seg].len) ++seg, off = 0;
    }
    left -= chunk;
  }
  return Status::Ok();
}

uint32_t CrcOf(const std::vector<WireSeg>& segs) {
  uint32_t crc = 0;
  for (const WireSeg& s : segs) crc = Crc32c(crc, reinterpret_cast<const void*>(s.addr), s.len);
  return crc;
}

// Header (unless !with_header) + optional table + payload gathered from `segs` + optional CRC
// trailer, in one send.
Status SendWithPayload(int fd, const Header& h, const std::vector<WireSeg>* table,
                       const std::vector<WireSeg>& segs, const uint32_t* crc,
                       bool with_header = true) {
  std::vector<iovec> iov;
  iov.reserve(segs.size() + 3);
  if (with_header) iov.push_back({const_cast<Header*>(&h), sizeof(h)});
  if (table && !table->empty()) {
    iov.push_back({const_cast<WireSeg*>(table->data()), table->size() * sizeof(WireSeg)});
  }
  for (const WireSeg& s : segs) {
    if (s.len > 0) iov.push_back({reinterpret_cast<void*>(s.addr), s.len});
  }
  if (crc) iov.push_back({const_cast<uint32_t*>(crc), sizeof(*crc)});
  return net::SendAll(fd, iov);
}

Status StatusFromWire(uint32_t code, std::string msg) {
  if (code == 0) return Status::Ok();
  if (code >= static_cast<uint32_t>(Status::kNumCodes)) code = 13;
  return Status(static_cast<Status::Code>(code), "peer: " + msg);
}

// ---------------------------------------------------------------------------------------------
// Receiving side: one thread per accepted connection.

class ServerConn {
 public:
  ServerConn(EngineServices* engine, int fd) : engine_(engine), fd_(fd) {
    thread_ = std::thread([this] { Run(); });
  }
  ~ServerConn() {
    shutdown(fd_, SHUT_RDWR);  // unblocks the thread; close only after it is gone
    if (thread_.joinable()) thread_.join();
    close(fd_);
  }
  bool done() const { return done_; }

 private:
  void Run() {
    pthread_setname_np(pthread_self(), "lkv-tcp-serve");
    Status st = Serve();
    (void)st;  // the peer went away or broke the protocol: drop the connection
    done_ = true;
  }

  Status Serve() {
    Header h;
    LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd_, &h, sizeof(h)));
    if (h.magic != kMagic || h.type != kHello) return Protocol("expected HELLO");
    LLUMNIX_KV_RETURN_IF_ERROR(RecvString(fd_, h.count, &peer_));
    while (true) {
      LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd_, &h, sizeof(h)));
      if (h.magic != kMagic) return Protocol("bad magic");
      switch (h.type) {
        case kWrite:
          LLUMNIX_KV_RETURN_IF_ERROR(OnWrite(h));
          break;
        case kReadReq:
          LLUMNIX_KV_RETURN_IF_ERROR(OnRead(h));
          break;
        case kNotify: {
          std::string msg;
          LLUMNIX_KV_RETURN_IF_ERROR(RecvString(fd_, h.count, &msg));
          engine_->Deliver({peer_, std::move(msg)});
          break;
        }
        default:
          return Protocol("unexpected message type " + std::to_string(h.type));
      }
    }
  }

  Status CheckTable(const std::vector<WireSeg>& table) const {
    for (const WireSeg& s : table) {
      int32_t device = -1;
      LLUMNIX_KV_RETURN_IF_ERROR(engine_->CheckLocal(s.addr, s.len, &device));
      if (device >= 0) return Status::Unsupported("tcp cannot move device memory");
    }
    return Status::Ok();
  }

  Status Reply(const Header& req, uint8_t type, const Status& st) {
    Header r;
    r.type = type;
    r.batch = req.batch;
    r.part = req.part;
    r.status = static_cast<uint32_t>(st.code());
    r.count = st.message().size();
    return SendMessage(fd_, r, st.message().data(), st.message().size());
  }

  Status OnWrite(const Header& h) {
    std::vector<WireSeg> table;
    LLUMNIX_KV_RETURN_IF_ERROR(RecvTable(fd_, h, &table));
    const bool crc = h.flags & kFlagCrc;
    Status st = CheckTable(table);
    if (!st.ok()) {
      LLUMNIX_KV_RETURN_IF_ERROR(net::Discard(fd_, h.bytes + (crc ? 4 : 0)));
      return Reply(h, kAck, st);
    }
    LLUMNIX_KV_RETURN_IF_ERROR((h.flags & kFlagPacked) ? RecvPacked(fd_, table, &bounce_)
                                                       : RecvPayload(fd_, table));
    const int64_t every = engine_->config().debug_corrupt_every;
    if (every > 0 && ++writes_ % every == 0 && h.bytes > 0) {
      for (WireSeg& s : table) {
        if (s.len > 0) {
          *reinterpret_cast<unsigned char*>(s.addr) ^= 0x5A;
          break;
        }
      }
    }
    if (crc) {
      uint32_t sent = 0;
      LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd_, &sent, sizeof(sent)));
      if (sent != CrcOf(table)) {
        st = Status(Status::Code::kCorruption, "CRC mismatch in batch " + std::to_string(h.batch) +
                                                   " part " + std::to_string(h.part));
      }
    }
    return Reply(h, kAck, st);
  }

  Status OnRead(const Header& h) {
    std::vector<WireSeg> table;
    LLUMNIX_KV_RETURN_IF_ERROR(RecvTable(fd_, h, &table));
    const Status st = CheckTable(table);
    if (!st.ok()) return Reply(h, kReadResp, st);
    Header r;
    r.type = kReadResp;
    r.batch = h.batch;
    r.part = h.part;
    r.flags = h.flags;
    r.bytes = h.bytes;
    uint32_t crc = 0;
    if (h.flags & kFlagCrc) crc = CrcOf(table);
    const uint32_t* trailer = (h.flags & kFlagCrc) ? &crc : nullptr;
    if (!(h.flags & kFlagPacked)) return SendWithPayload(fd_, r, nullptr, table, trailer);
    LLUMNIX_KV_RETURN_IF_ERROR(SendWithPayload(fd_, r, nullptr, {}, nullptr));
    LLUMNIX_KV_RETURN_IF_ERROR(SendPacked(fd_, table, &bounce_));
    return trailer ? SendWithPayload(fd_, {}, nullptr, {}, trailer, false) : Status::Ok();
  }

  EngineServices* engine_;
  const int fd_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::string peer_;
  int64_t writes_ = 0;
  std::vector<char> bounce_;
};

// ---------------------------------------------------------------------------------------------
// Sending side: a link is `tcp_streams` client connections, each with a sender and a reader.

struct Job {
  enum Kind { kPart, kNotify } kind = kPart;
  std::shared_ptr<Batch> batch;
  uint32_t part = 0;
  std::vector<WireSeg> local;   // where the part's bytes are (WRITE) or go (READ)
  std::vector<WireSeg> remote;  // the peer's addresses, same lengths
  uint64_t bytes = 0;
  std::string message;
};

class ClientStream {
 public:
  ClientStream(int fd, EngineServices* engine) : fd_(fd), engine_(engine) {
    sender_ = std::thread([this] { SendLoop(); });
    reader_ = std::thread([this] { ReadLoop(); });
  }
  ~ClientStream() {
    Close();
    close(fd_);
  }

  void Push(Job job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!dead_) {
        queue_.push_back(std::move(job));
        cv_.notify_one();
        return;
      }
    }
    Finish(job, Status(Status::Code::kPeerLost, "connection to peer is closed"));
  }
  bool alive() const { return !dead_; }
  void Close() {
    Kill(Status(Status::Code::kPeerLost, "link closed"));
    if (sender_.joinable()) sender_.join();
    if (reader_.joinable()) reader_.join();
  }

 private:
  static void Finish(Job& job, const Status& st) {
    if (job.kind == Job::kPart) job.batch->PartDone(st, job.bytes);
  }

  // Marks the stream dead and fails every queued and in-flight part (once).
  void Kill(const Status& why) {
    std::deque<Job> failed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!dead_) {
        dead_ = true;
        shutdown(fd_, SHUT_RDWR);
      }
      failed.swap(queue_);
      for (Job& j : pending_) failed.push_back(std::move(j));
      pending_.clear();
      cv_.notify_all();
    }
    for (Job& j : failed) Finish(j, why);
  }

  void SendLoop() {
    pthread_setname_np(pthread_self(), "lkv-tcp-send");
    while (true) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return dead_ || !queue_.empty(); });
        if (dead_) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      Status st = Send(&job);
      if (!st.ok()) {
        Kill(st.code() == Status::Code::kPeerLost ? st
                                                  : Status(Status::Code::kPeerLost, st.message()));
        return;
      }
    }
  }

  Status Send(Job* job) {
    if (job->kind == Job::kNotify) {
      Header h;
      h.type = kNotify;
      h.count = job->message.size();
      return SendMessage(fd_, h, job->message.data(), job->message.size());
    }
    Batch& b = *job->batch;
    if (b.cancelled) {
      job->batch->PartDone(Status(Status::Code::kCancelled, "batch cancelled"), 0);
      return Status::Ok();
    }
    const bool crc = b.opts.crc || engine_->config().crc;
    Header h;
    h.type = b.op == TransferOp::kWrite ? kWrite : kReadReq;
    const bool packed = Packed(job->bytes, job->remote.size());
    h.flags = (crc ? kFlagCrc : 0) | (packed ? kFlagPacked : 0);
    h.batch = b.id;
    h.part = job->part;
    h.count = job->remote.size();
    h.bytes = job->bytes;
    const bool write = b.op == TransferOp::kWrite;
    uint32_t sum = write && crc ? CrcOf(job->local) : 0;
    // Record before sending: the response may arrive before the send call returns.
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (dead_) return Status(Status::Code::kPeerLost, "connection to peer is closed");
      pending_.push_back(*job);
    }
    if (!write || !packed) {
      return SendWithPayload(fd_, h, &job->remote, write ? job->local : std::vector<WireSeg>{},
                             write && crc ? &sum : nullptr);
    }
    LLUMNIX_KV_RETURN_IF_ERROR(SendWithPayload(fd_, h, &job->remote, {}, nullptr));
    LLUMNIX_KV_RETURN_IF_ERROR(SendPacked(fd_, job->local, &send_bounce_));
    return crc ? SendWithPayload(fd_, {}, nullptr, {}, &sum, false) : Status::Ok();
  }

  void ReadLoop() {
    pthread_setname_np(pthread_self(), "lkv-tcp-read");
    while (true) {
      Header h;
      // Waits in poll, not recv: the sender thread's WRITE payload would wake a recv at every
      // ACK (measured: 57 instead of 37 context switches per 32 MiB batch).
      Status st = net::WaitReadable(fd_);
      if (st.ok()) st = net::RecvAll(fd_, &h, sizeof(h));
      Job job;
      if (st.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (h.magic != kMagic || pending_.empty()) {
          st = Protocol("unexpected response");
        } else {
          job = std::move(pending_.front());
          pending_.pop_front();
          if (job.batch->id != h.batch || job.part != h.part) st = Protocol("response mismatch");
        }
      }
      if (st.ok()) st = OnResponse(h, job);
      if (!st.ok()) {
        if (job.batch) Finish(job, st);
        Kill(st);
        return;
      }
    }
  }

  // Receives the rest of a response and finishes its part. Returns non-OK only when the
  // connection is unusable (the part is then failed by the caller).
  Status OnResponse(const Header& h, Job& job) {
    std::string msg;
    if (h.type == kAck || h.status != 0) {
      LLUMNIX_KV_RETURN_IF_ERROR(RecvString(fd_, h.count, &msg));
      job.batch->PartDone(StatusFromWire(h.status, msg), job.bytes);
      return Status::Ok();
    }
    if (h.type != kReadResp || h.bytes != job.bytes) return Protocol("bad READ_RESP");
    LLUMNIX_KV_RETURN_IF_ERROR((h.flags & kFlagPacked) ? RecvPacked(fd_, job.local, &recv_bounce_)
                                                       : RecvPayload(fd_, job.local));
    Status result;
    if (h.flags & kFlagCrc) {
      uint32_t sent = 0;
      LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd_, &sent, sizeof(sent)));
      if (sent != CrcOf(job.local)) {
        result =
            Status(Status::Code::kCorruption, "CRC mismatch in batch " + std::to_string(h.batch) +
                                                  " part " + std::to_string(h.part));
      }
    }
    job.batch->PartDone(result, job.bytes);
    return Status::Ok();
  }

  int fd_;
  EngineServices* engine_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::deque<Job> pending_;
  std::vector<char> send_bounce_;  // sender thread
  std::vector<char> recv_bounce_;  // reader thread
  std::atomic<bool> dead_{false};
  std::thread sender_;
  std::thread reader_;
};

class TcpLink : public Link {
 public:
  explicit TcpLink(std::vector<std::unique_ptr<ClientStream>> streams)
      : streams_(std::move(streams)) {}
  ~TcpLink() override { Close(); }

  Status Post(const std::shared_ptr<Batch>& batch) override {
    if (!Alive()) return Status(Status::Code::kPeerLost, "connection to peer is closed");
    const size_t n = batch->bytes < kSplitBytes ? 1 : streams_.size();
    std::vector<Job> jobs(n);
    const uint64_t share = (batch->bytes + n - 1) / n;
    size_t k = 0;
    for (const Segment& s : batch->segs) {
      uint64_t off = 0;
      while (off < s.len) {
        if (jobs[k].bytes >= share && k + 1 < n) ++k;
        const uint64_t take = std::min(s.len - off, std::max<uint64_t>(share - jobs[k].bytes, 1));
        jobs[k].local.push_back({s.local + off, take});
        jobs[k].remote.push_back({s.remote + off, take});
        jobs[k].bytes += take;
        off += take;
      }
    }
    batch->SetParts(static_cast<int>(n));
    const size_t first = next_.fetch_add(1) % streams_.size();
    for (size_t i = 0; i < n; ++i) {
      jobs[i].batch = batch;
      jobs[i].part = static_cast<uint32_t>(i);
      streams_[(first + i) % streams_.size()]->Push(std::move(jobs[i]));
    }
    return Status::Ok();
  }

  Status Notify(const std::string& msg) override {
    if (!Alive()) return Status(Status::Code::kPeerLost, "connection to peer is closed");
    Job job;
    job.kind = Job::kNotify;
    job.message = msg;
    streams_[0]->Push(std::move(job));
    return Status::Ok();
  }

  bool Alive() const override {
    return std::all_of(streams_.begin(), streams_.end(), [](auto& s) { return s->alive(); });
  }
  void Close() override {
    for (auto& s : streams_) s->Close();
  }

 private:
  std::vector<std::unique_ptr<ClientStream>> streams_;
  std::atomic<size_t> next_{0};
};

class TcpTransport : public Transport {
 public:
  explicit TcpTransport(EngineServices* engine) : engine_(engine) {}
  ~TcpTransport() override { Shutdown(); }

  Status Start() {
    port_ = engine_->config().listen_port;
    LLUMNIX_KV_RETURN_IF_ERROR(net::Listen(engine_->config().listen_host, &port_, &listen_fd_));
    if (pipe2(wake_, O_CLOEXEC) != 0) return Status::Internal("pipe failed");
    acceptor_ = std::thread([this] { AcceptLoop(); });
    return Status::Ok();
  }

  std::string Name() const override { return "tcp"; }
  std::string Endpoint() const override {
    return engine_->config().listen_host + ":" + std::to_string(port_);
  }
  bool Reaches(const PeerDescriptor& peer) const override { return peer.endpoints.count("tcp"); }

  Status Connect(const PeerDescriptor& peer, std::unique_ptr<Link>* link) override {
    const std::string& ep = peer.endpoints.at("tcp");
    const size_t colon = ep.rfind(':');
    if (colon == std::string::npos) return Status(Status::Code::kBadDescriptor, "bad tcp endpoint");
    const std::string host = ep.substr(0, colon);
    int port = 0;
    try {
      port = std::stoi(ep.substr(colon + 1));
    } catch (...) {
      return Status(Status::Code::kBadDescriptor, "bad tcp endpoint port");
    }
    const EngineConfig& cfg = engine_->config();
    std::vector<std::unique_ptr<ClientStream>> streams;
    for (int i = 0; i < std::max(1, cfg.tcp_streams); ++i) {
      int fd = -1;
      LLUMNIX_KV_RETURN_IF_ERROR(net::Connect(host, port, cfg.connect_timeout_s, &fd));
      Header h;
      h.type = kHello;
      h.count = engine_->name().size();
      const Status st = SendMessage(fd, h, engine_->name().data(), engine_->name().size());
      if (!st.ok()) {
        net::CloseQuietly(fd);
        return st;
      }
      streams.push_back(std::make_unique<ClientStream>(fd, engine_));
    }
    *link = std::make_unique<TcpLink>(std::move(streams));
    return Status::Ok();
  }

  void Shutdown() override {
    if (listen_fd_ < 0) return;
    const char x = 1;
    (void)!write(wake_[1], &x, 1);
    if (acceptor_.joinable()) acceptor_.join();
    net::CloseQuietly(listen_fd_);
    listen_fd_ = -1;
    close(wake_[0]);
    close(wake_[1]);
    std::lock_guard<std::mutex> lock(mu_);
    conns_.clear();  // closes every connection and joins its thread
  }

 private:
  void AcceptLoop() {
    pthread_setname_np(pthread_self(), "lkv-tcp-accept");
    while (true) {
      pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
      if (poll(fds, 2, 1000) < 0 && errno != EINTR) return;
      if (fds[1].revents) return;
      {
        std::lock_guard<std::mutex> lock(mu_);
        conns_.remove_if([](const std::unique_ptr<ServerConn>& c) { return c->done(); });
      }
      if (!(fds[0].revents & POLLIN)) continue;
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      net::Tune(fd);
      std::lock_guard<std::mutex> lock(mu_);
      conns_.push_back(std::make_unique<ServerConn>(engine_, fd));
    }
  }

  EngineServices* engine_;
  int port_ = 0;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::thread acceptor_;
  std::mutex mu_;
  std::list<std::unique_ptr<ServerConn>> conns_;
};

}  // namespace

std::unique_ptr<Transport> MakeTcpTransport(EngineServices* engine, Status* st) {
  auto t = std::make_unique<TcpTransport>(engine);
  *st = t->Start();
  if (!st->ok()) return nullptr;
  return t;
}

}  // namespace llumnix_kv
