// A plain-socket baseline for `llumnix-kv bench`: the fewest steps that move a batch of pieces
// from one process's memory into another's over TCP, to put the tcp transport's figures next
// to. Per stream and batch: one gather send of (count, bytes, count x {offset, len}, payload),
// one scatter receive into place, one byte back. No registration, queues, validation beyond
// bounds, or completion tracking; the same socket options as the tcp transport.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llumnix_kv/status.h"

namespace llumnix_kv::rawsock {

struct Piece {
  uint64_t local;   // address in the sender
  uint64_t offset;  // where it lands, from the receiver's base
  uint64_t len;
};

// A listening socket on host (any free port).
Status Listen(const std::string& host, int* fd, int* port);

// Accepts `streams` connections on listen_fd (each within timeout_s) and serves them until
// every one closes: each batch lands in [base, base + span). Closes listen_fd.
Status Serve(int listen_fd, int streams, uint64_t base, uint64_t span, double timeout_s);

class Sender {
 public:
  static Status Connect(const std::string& host, int port, int streams, double timeout_s,
                        std::unique_ptr<Sender>* out);
  ~Sender();
  // Moves the pieces, split by bytes into one share per stream, all streams at once; returns
  // when the receiver has acknowledged every share, or Timeout when a send or receive blocks
  // for longer than Connect's timeout_s.
  Status Send(const std::vector<Piece>& pieces);
  void Close();  // the receiver's Serve returns once every sender has closed

 private:
  explicit Sender(std::vector<int> fds) : fds_(std::move(fds)) {}
  std::vector<int> fds_;
};

}  // namespace llumnix_kv::rawsock
