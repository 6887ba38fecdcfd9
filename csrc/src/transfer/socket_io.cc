#include "socket_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace llumnix_kv::net {
namespace {

Status FromErrno(const char* what) {
  const int e = errno;
  const std::string msg = std::string(what) + ": " + std::strerror(e);
  if (e == ECONNRESET || e == EPIPE || e == ENOTCONN || e == ECONNREFUSED || e == ESHUTDOWN ||
      e == EBADF) {
    return Status(Status::Code::kPeerLost, msg);
  }
  if (e == EAGAIN || e == ETIMEDOUT) return Status(Status::Code::kTimeout, msg);
  return Status(Status::Code::kInternal, msg);
}

Status Resolve(const std::string& host, int port, sockaddr_storage* addr, socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Status::InvalidArgument("cannot resolve " + host + ": " + gai_strerror(rc));
  }
  std::memcpy(addr, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return Status::Ok();
}

// Drops the first n bytes from iov[*first..]: whole entries advance *first, a partial one is
// trimmed in place.
void Advance(std::vector<iovec>& iov, size_t* first, size_t n) {
  while (*first < iov.size() && n >= iov[*first].iov_len) n -= iov[(*first)++].iov_len;
  if (n > 0) {
    iov[*first].iov_base = static_cast<char*>(iov[*first].iov_base) + n;
    iov[*first].iov_len -= n;
  }
}

}  // namespace

Status SendAll(int fd, std::vector<iovec>& iov) {
  size_t first = 0;
  while (first < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    const ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FromErrno("send");
    }
    Advance(iov, &first, static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r == 0) return Status(Status::Code::kPeerLost, "connection closed by peer");
    if (r < 0) {
      if (errno == EINTR) continue;
      return FromErrno("recv");
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status WaitReadable(int fd) {
  pollfd p{fd, POLLIN, 0};
  while (poll(&p, 1, -1) < 0) {
    if (errno != EINTR) return FromErrno("poll");
  }
  return Status::Ok();
}

Status RecvAllIov(int fd, std::vector<iovec>& iov) {
  size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
    const ssize_t n = recvmsg(fd, &msg, MSG_WAITALL);
    if (n == 0) return Status(Status::Code::kPeerLost, "connection closed by peer");
    if (n < 0) {
      if (errno == EINTR) continue;
      return FromErrno("recv");
    }
    Advance(iov, &first, static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status Discard(int fd, uint64_t n) {
  char buf[64 << 10];
  while (n > 0) {
    const size_t k = std::min<uint64_t>(n, sizeof(buf));
    LLUMNIX_KV_RETURN_IF_ERROR(RecvAll(fd, buf, k));
    n -= k;
  }
  return Status::Ok();
}

Status Connect(const std::string& host, int port, double timeout_s, int* out) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  LLUMNIX_KV_RETURN_IF_ERROR(Resolve(host, port, &addr, &len));
  const int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return FromErrno("socket");
  Tune(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0 && errno != EINPROGRESS) {
    const Status st = FromErrno("connect");
    close(fd);
    return st;
  }
  pollfd p{fd, POLLOUT, 0};
  const int rc = poll(&p, 1, static_cast<int>(timeout_s * 1000));
  int err = 0;
  socklen_t errlen = sizeof(err);
  if (rc <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errlen) < 0 || err != 0) {
    close(fd);
    if (rc == 0) {
      return Status(Status::Code::kTimeout,
                    "connect to " + host + ":" + std::to_string(port) + " timed out");
    }
    return Status(Status::Code::kPeerLost, "connect to " + host + ":" + std::to_string(port) +
                                               " failed: " + std::strerror(err ? err : errno));
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  *out = fd;
  return Status::Ok();
}

Status Listen(const std::string& host, int* port, int* out) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  LLUMNIX_KV_RETURN_IF_ERROR(Resolve(host, *port, &addr, &len));
  const int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return FromErrno("socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0 || listen(fd, 128) < 0) {
    const Status st = FromErrno("bind/listen");
    close(fd);
    return st;
  }
  sockaddr_storage bound{};
  socklen_t blen = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
  *port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  *out = fd;
  return Status::Ok();
}

void Tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void CloseQuietly(int fd) {
  if (fd >= 0) {
    shutdown(fd, SHUT_RDWR);
    close(fd);
  }
}

}  // namespace llumnix_kv::net
