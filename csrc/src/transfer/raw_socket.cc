#include "llumnix_kv/transfer/raw_socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "socket_io.h"

namespace llumnix_kv::rawsock {
namespace {

constexpr uint64_t kMaxPieces = uint64_t{1} << 24;

struct Head {
  uint64_t count = 0;
  uint64_t bytes = 0;
};

struct Place {
  uint64_t offset;
  uint64_t len;
};

Status ServeOne(int fd, uint64_t base, uint64_t span) {
  std::vector<Place> table;
  std::vector<iovec> iov;
  while (true) {
    Head h;
    Status st = net::RecvAll(fd, &h, sizeof(h));
    if (st.code() == Status::Code::kPeerLost) return Status::Ok();  // the sender is done
    LLUMNIX_KV_RETURN_IF_ERROR(st);
    if (h.count > kMaxPieces) return Status::InvalidArgument("too many pieces");
    table.resize(h.count);
    LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAll(fd, table.data(), h.count * sizeof(Place)));
    iov.clear();
    uint64_t total = 0;
    for (const Place& p : table) {
      if (p.offset > span || p.len > span - p.offset) {
        return Status::OutOfRange("piece outside the receiving buffer");
      }
      iov.push_back({reinterpret_cast<void*>(base + p.offset), p.len});
      total += p.len;
    }
    if (total != h.bytes) return Status::InvalidArgument("piece lengths do not add up");
    LLUMNIX_KV_RETURN_IF_ERROR(net::RecvAllIov(fd, iov));
    const char ack = 1;
    std::vector<iovec> out{{const_cast<char*>(&ack), 1}};
    LLUMNIX_KV_RETURN_IF_ERROR(net::SendAll(fd, out));
  }
}

Status SendShare(int fd, const std::vector<Piece>& share) {
  Head h;
  h.count = share.size();
  std::vector<Place> table;
  table.reserve(share.size());
  for (const Piece& p : share) {
    table.push_back({p.offset, p.len});
    h.bytes += p.len;
  }
  std::vector<iovec> iov{{&h, sizeof(h)}, {table.data(), table.size() * sizeof(Place)}};
  for (const Piece& p : share) iov.push_back({reinterpret_cast<void*>(p.local), p.len});
  LLUMNIX_KV_RETURN_IF_ERROR(net::SendAll(fd, iov));
  char ack = 0;
  return net::RecvAll(fd, &ack, 1);
}

}  // namespace

Status Listen(const std::string& host, int* fd, int* port) {
  *port = 0;
  return net::Listen(host, port, fd);
}

Status Serve(int listen_fd, int streams, uint64_t base, uint64_t span, double timeout_s) {
  std::vector<int> fds;
  Status st;
  for (int i = 0; i < streams && st.ok(); ++i) {
    pollfd p{listen_fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(timeout_s * 1000)) != 1) {
      st = Status(Status::Code::kTimeout, "no sender connected in time");
      break;
    }
    const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      st = Status(Status::Code::kPeerLost, "accept failed");
      break;
    }
    net::Tune(fd);
    fds.push_back(fd);
  }
  close(listen_fd);
  std::vector<Status> results(fds.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < fds.size() && st.ok(); ++i) {
    threads.emplace_back([&, i] { results[i] = ServeOne(fds[i], base, span); });
  }
  for (auto& t : threads) t.join();
  for (int fd : fds) net::CloseQuietly(fd);
  for (const Status& r : results) {
    if (st.ok() && !r.ok()) st = r;
  }
  return st;
}

Status Sender::Connect(const std::string& host, int port, int streams, double timeout_s,
                       std::unique_ptr<Sender>* out) {
  std::vector<int> fds;
  for (int i = 0; i < std::max(1, streams); ++i) {
    int fd = -1;
    const Status st = net::Connect(host, port, timeout_s, &fd);
    if (!st.ok()) {
      for (int f : fds) net::CloseQuietly(f);
      return st;
    }
    // Every blocking send or receive of a batch gives up after timeout_s (EAGAIN: Timeout).
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout_s);
    tv.tv_usec = static_cast<suseconds_t>((timeout_s - static_cast<double>(tv.tv_sec)) * 1e6);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    fds.push_back(fd);
  }
  out->reset(new Sender(std::move(fds)));
  return Status::Ok();
}

Sender::~Sender() { Close(); }

void Sender::Close() {
  for (int fd : fds_) net::CloseQuietly(fd);
  fds_.clear();
}

Status Sender::Send(const std::vector<Piece>& pieces) {
  // Equal shares of bytes, in order, as the tcp transport splits a batch across its streams.
  const size_t n = fds_.size();
  if (n == 0) return Status(Status::Code::kPeerLost, "sender is closed");
  uint64_t total = 0;
  for (const Piece& p : pieces) total += p.len;
  const uint64_t share = (total + n - 1) / n;
  std::vector<std::vector<Piece>> shares(n);
  std::vector<uint64_t> filled(n, 0);
  size_t k = 0;
  for (const Piece& p : pieces) {
    uint64_t off = 0;
    while (off < p.len) {
      if (filled[k] >= share && k + 1 < n) ++k;
      const uint64_t take = std::min(p.len - off, std::max<uint64_t>(share - filled[k], 1));
      shares[k].push_back({p.local + off, p.offset + off, take});
      filled[k] += take;
      off += take;
    }
  }
  std::vector<Status> results(n);
  std::vector<std::thread> threads;
  for (size_t i = 1; i < n; ++i) {
    threads.emplace_back([&, i] { results[i] = SendShare(fds_[i], shares[i]); });
  }
  results[0] = SendShare(fds_[0], shares[0]);
  for (auto& t : threads) t.join();
  for (const Status& r : results) LLUMNIX_KV_RETURN_IF_ERROR(r);
  return Status::Ok();
}

}  // namespace llumnix_kv::rawsock
