// Value types of the transfer engine's public API.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llumnix_kv {

enum class TransferOp : int {
  kWrite = 0,  // push: local memory -> the peer's memory
  kRead = 1,   // pull: the peer's memory -> local memory
};

// One contiguous piece of a transfer: `len` bytes between a local and a remote address. Both
// must lie inside memory registered with the respective engine.
struct Segment {
  uint64_t local = 0;
  uint64_t remote = 0;
  uint64_t len = 0;
};

enum class BatchState : int { kPending = 0, kDone = 1, kFailed = 2 };

struct Notification {
  std::string peer;  // the sending engine's agent name
  std::string message;
};

struct SubmitOptions {
  std::string notify;     // delivered to the peer after the batch's data has landed
  double timeout_s = 0;   // > 0: the batch fails with Timeout if not done by then
  std::string transport;  // "" = the link's transport; else force one ("tcp", "shm", ...)
  bool crc = false;       // end-to-end CRC32C of the payload (also: EngineConfig::crc)
  // "direct": one-sided, segment by segment into the peer's memory; "staged": the segments
  // travel gathered as one message and the receiver scatters them; "auto": staged when the
  // average segment is below EngineConfig::staged_below_bytes, and ucx stages host memory for
  // a peer on the same host whatever the size (its put/get would go over tcp there). A
  // transport that has one way only uses it (tcp is always staged, shm and local are always
  // direct).
  std::string mode = "auto";
};

struct EngineConfig {
  std::string name;  // agent name; "" = generated
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;                                                // 0 = any free port
  std::vector<std::string> transports{"local", "shm", "ucx", "tcp"};  // allowed, best first
  int tcp_streams = 2;  // parallel TCP connections per peer
  double connect_timeout_s = 10;
  bool crc = false;                        // CRC every batch
  uint64_t staged_below_bytes = 64 << 10;  // "auto" stages batches of smaller segments
  int64_t debug_corrupt_every = 0;         // tests only: flip a received byte in every Nth part
};

struct BatchStatus {
  BatchState state = BatchState::kPending;
  uint64_t bytes = 0;       // payload bytes of the batch
  uint64_t done_bytes = 0;  // bytes landed so far
  std::string transport;
  bool staged = false;  // the batch asked for staged mode (after resolving "auto")
};

}  // namespace llumnix_kv
