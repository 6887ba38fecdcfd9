// Built when UCX is not compiled in: the engine then simply offers no ucx transport.
#include "transport.h"

namespace llumnix_kv {

std::unique_ptr<Transport> MakeUcxTransport(EngineServices*, Status* st) {
  *st = Status::Unsupported("llumnix_kv was built without UCX");
  return nullptr;
}

}  // namespace llumnix_kv
