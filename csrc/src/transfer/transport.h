// The interface every transport implements. A transport declares what it can do (Reaches,
// SupportsDevice); optional methods have defaults, so a transport writes only what it supports.
// Lifecycle: the engine registers memory with every transport (each may return a key that
// peers need, e.g. a packed rkey), publishes Endpoint() and the keys in its descriptor, and
// connects a Link per peer on demand. Links are asynchronous: Post() returns at once and the
// link reports each part through Batch::PartDone from its own threads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "batch.h"
#include "llumnix_kv/status.h"
#include "llumnix_kv/transfer/types.h"

namespace llumnix_kv {

struct LocalRegion {
  uint64_t handle = 0;
  uint64_t addr = 0;
  uint64_t len = 0;
  int32_t device = -1;
};

struct RemoteRegion {
  uint64_t addr = 0;
  uint64_t len = 0;
  int32_t device = -1;
  std::map<std::string, std::string> keys;  // transport name -> key blob
};

struct PeerDescriptor {
  std::string name;
  std::string host_id;  // equal for engines on one host (boot id)
  uint32_t pid = 0;
  std::map<std::string, std::string> endpoints;  // transport name -> endpoint blob
  std::vector<RemoteRegion> regions;             // sorted by addr

  // The region holding [addr, addr + len), or null.
  const RemoteRegion* Find(uint64_t addr, uint64_t len) const;
};

// What transports may ask of the engine.
class EngineServices {
 public:
  virtual ~EngineServices() = default;
  virtual const EngineConfig& config() const = 0;
  virtual const std::string& name() const = 0;
  virtual const std::string& host_id() const = 0;
  // OK if [addr, addr + len) lies in registered memory; sets *device.
  virtual Status CheckLocal(uint64_t addr, uint64_t len, int32_t* device) const = 0;
  virtual void Deliver(Notification n) = 0;
};

class Link {
 public:
  virtual ~Link() = default;
  // Starts moving `batch` (all of it); reports through batch->PartDone after SetParts.
  virtual Status Post(const std::shared_ptr<Batch>& batch) = 0;
  // Sends a notification, ordered after every batch this link has completed. Links that
  // cannot notify return Unsupported and the engine uses its control link.
  virtual Status Notify(const std::string&) { return Status::Unsupported("no notifications"); }
  virtual bool Alive() const = 0;
  // Fails what is in flight with PeerLost and joins the link's threads: after it returns the
  // link touches no memory.
  virtual void Close() = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string Name() const = 0;
  virtual std::string Endpoint() const { return ""; }
  virtual Status RegisterRegion(const LocalRegion&, std::string* key) {
    key->clear();
    return Status::Ok();
  }
  virtual void DeregisterRegion(const LocalRegion&) {}
  virtual bool Reaches(const PeerDescriptor& peer) const = 0;
  virtual bool SupportsDevice() const { return false; }
  virtual Status Connect(const PeerDescriptor& peer, std::unique_ptr<Link>* link) = 0;
  virtual void Shutdown() {}
};

// Factories (each in its own file). A null result means "not built in".
std::unique_ptr<Transport> MakeTcpTransport(EngineServices* engine, Status* st);
std::unique_ptr<Transport> MakeShmTransport(EngineServices* engine, bool same_process_only);
std::unique_ptr<Transport> MakeUcxTransport(EngineServices* engine, Status* st);

}  // namespace llumnix_kv
