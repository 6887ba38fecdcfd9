// Blocking socket helpers for the tcp transport: whole-message sends and receives that turn
// every failure into a Status (a closed or reset connection is PeerLost).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "llumnix_kv/status.h"

namespace llumnix_kv::net {

Status SendAll(int fd, std::vector<iovec>& iov);  // consumes `iov`
Status RecvAll(int fd, void* buf, size_t n);
// Receives into the buffers of `iov` in order (scatter, no bounce copy); consumes `iov`.
Status RecvAllIov(int fd, std::vector<iovec>& iov);
Status Discard(int fd, uint64_t n);
// Connects to host:port within timeout_s, with TCP_NODELAY and large buffers.
Status Connect(const std::string& host, int port, double timeout_s, int* fd);
// Binds and listens; *port gets the bound port.
Status Listen(const std::string& host, int* port, int* fd);
// TCP_NODELAY and large socket buffers.
void Tune(int fd);
void CloseQuietly(int fd);

}  // namespace llumnix_kv::net
