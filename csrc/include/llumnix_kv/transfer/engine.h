// TransferEngine: one per process. Registers memory, publishes a descriptor that peers load,
// and moves batches of segments to and from peers asynchronously:
//   submit -> poll / wait (with a deadline) -> release,
// with a notification delivered to the peer after a batch's data has landed. Transports:
// local (same process), shm (same host), ucx (when built with UCX), tcp (always; also the
// control channel that carries notifications and notices a lost peer).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "llumnix_kv/status.h"
#include "llumnix_kv/transfer/types.h"

namespace llumnix_kv {

class TransferEngine {
 public:
  static Status Create(const EngineConfig& config, std::unique_ptr<TransferEngine>* out);
  virtual ~TransferEngine() = default;

  virtual const std::string& name() const = 0;
  virtual std::vector<std::string> transports() const = 0;  // usable here, best first
  // Those of transports() that move CUDA device memory (none where CUDA is not built in).
  virtual std::vector<std::string> device_transports() const = 0;

  // Host memory any same-host peer can map (zero-copy shm); registered like any memory.
  virtual Status AllocShared(uint64_t bytes, uint64_t* addr) = 0;
  virtual Status FreeShared(uint64_t addr) = 0;

  virtual Status RegisterMemory(uint64_t addr, uint64_t len, int32_t device, uint64_t* handle) = 0;
  virtual Status DeregisterMemory(uint64_t handle) = 0;
  virtual size_t NumRegistrations() const = 0;

  // Serialised identity, endpoints and registered memory (a snapshot: load it again after
  // registering more memory).
  virtual std::string Descriptor() const = 0;
  // Loads a peer's descriptor and connects; `transport` "" picks the best both sides support.
  virtual Status AddPeer(std::string_view descriptor, const std::string& transport, uint64_t* peer,
                         std::string* chosen) = 0;
  virtual Status RemovePeer(uint64_t peer) = 0;
  virtual Status PeerName(uint64_t peer, std::string* name) const = 0;

  virtual Status Submit(uint64_t peer, TransferOp op, std::vector<Segment> segments,
                        const SubmitOptions& options, uint64_t* batch) = 0;
  virtual Status Poll(uint64_t batch, BatchStatus* status) = 0;
  virtual Status Wait(uint64_t batch, double timeout_s, BatchStatus* status) = 0;
  virtual Status Cancel(uint64_t batch) = 0;
  virtual Status Release(uint64_t batch) = 0;

  virtual std::vector<Notification> TakeNotifications() = 0;
  // Waits up to timeout_s for at least one notification; Timeout if none came.
  virtual Status WaitNotifications(double timeout_s, std::vector<Notification>* out) = 0;

  // Closes every link and the listener, releases every registration. Idempotent.
  virtual void Shutdown() = 0;

  // Registrations alive in this process across all engines (for leak checks).
  static int64_t LiveRegistrations();
};

}  // namespace llumnix_kv
