// llumnix_kv._C: the Python binding of the data-plane core. Memory crosses as integer addresses;
// every blocking or O(plan) call runs without the GIL; a non-OK Status becomes the exception
// class that llumnix_kv.errors maps its code to.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "llumnix_kv/copy.h"
#include "llumnix_kv/layout.h"
#include "llumnix_kv/plan.h"
#include "llumnix_kv/status.h"
#include "llumnix_kv/transfer/engine.h"
#include "llumnix_kv/transfer/raw_socket.h"

namespace py = pybind11;
using namespace llumnix_kv;

namespace {

void Check(const Status& st) {
  if (st.ok()) return;
  py::object cls =
      py::module_::import("llumnix_kv.errors").attr("error_for_code")(static_cast<int>(st.code()));
  PyErr_SetString(cls.ptr(), st.message().c_str());
  throw py::error_already_set();
}

template <typename T>
py::array_t<T> ToNumpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<int32_t> ToBlockTable(const IndexArray& a, const char* side) {
  if (a.ndim() != 1) Check(Status::InvalidArgument(std::string(side) + " block table must be 1-D"));
  std::vector<int32_t> out(a.size());
  const int64_t* p = a.data();
  for (py::ssize_t i = 0; i < a.size(); ++i) {
    if (p[i] < 0 || p[i] > std::numeric_limits<int32_t>::max()) {
      Check(Status::OutOfRange(std::string(side) + " block id " + std::to_string(p[i]) +
                               " at position " + std::to_string(i) + " is out of range"));
    }
    out[i] = static_cast<int32_t>(p[i]);
  }
  return out;
}

HeadRange ToHeads(const std::optional<std::pair<int32_t, int32_t>>& r, const KvLayout& l) {
  return r ? HeadRange{r->first, r->second} : HeadRange{0, l.num_heads};
}

CopyTarget MakeTarget(const std::vector<uint64_t>& src, const std::vector<uint64_t>& dst,
                      uint64_t staging, uint64_t staging_bytes) {
  return {src.data(), src.size(), dst.data(), dst.size(), staging, staging_bytes};
}

CopyMode ToMode(int mode) {
  if (mode < 0 || mode > 2) Check(Status::InvalidArgument("copy mode must be 0, 1 or 2"));
  return static_cast<CopyMode>(mode);
}

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

py::tuple StatusTuple(const BatchStatus& b) {
  return py::make_tuple(static_cast<int>(b.state), b.bytes, b.done_bytes, b.transport, b.staged);
}

py::list NotificationList(const std::vector<Notification>& ns) {
  py::list out;
  for (const Notification& n : ns) out.append(py::make_tuple(n.peer, py::bytes(n.message)));
  return out;
}

// Runs `fn` without the GIL, then raises its status.
template <typename Fn>
void Released(Fn&& fn) {
  Status st;
  {
    py::gil_scoped_release release;
    st = fn();
  }
  Check(st);
}

void BindTransferEngine(py::module_& m) {
  py::class_<TransferEngine>(m, "TransferEngine")
      .def(py::init([](const std::string& name, const std::string& listen_host, int listen_port,
                       std::vector<std::string> transports, int tcp_streams,
                       double connect_timeout_s, bool crc, uint64_t staged_below_bytes,
                       int64_t debug_corrupt_every) {
             EngineConfig cfg;
             cfg.name = name;
             cfg.listen_host = listen_host;
             cfg.listen_port = listen_port;
             cfg.transports = std::move(transports);
             cfg.tcp_streams = tcp_streams;
             cfg.connect_timeout_s = connect_timeout_s;
             cfg.crc = crc;
             cfg.staged_below_bytes = staged_below_bytes;
             cfg.debug_corrupt_every = debug_corrupt_every;
             std::unique_ptr<TransferEngine> engine;
             Released([&] { return TransferEngine::Create(cfg, &engine); });
             return engine;
           }),
           py::arg("name") = "", py::arg("listen_host") = "127.0.0.1", py::arg("listen_port") = 0,
           py::arg("transports") = std::vector<std::string>{"local", "shm", "ucx", "tcp"},
           py::arg("tcp_streams") = 2, py::arg("connect_timeout_s") = 10.0, py::arg("crc") = false,
           py::arg("staged_below_bytes") = 64 << 10, py::arg("debug_corrupt_every") = 0)
      .def_property_readonly("name", &TransferEngine::name)
      .def("transports", &TransferEngine::transports)
      .def("device_transports", &TransferEngine::device_transports)
      .def(
          "alloc_shared",
          [](TransferEngine& e, uint64_t bytes) {
            uint64_t addr = 0;
            Check(e.AllocShared(bytes, &addr));
            return addr;
          },
          py::arg("bytes"))
      .def(
          "free_shared", [](TransferEngine& e, uint64_t addr) { Check(e.FreeShared(addr)); },
          py::arg("addr"))
      .def(
          "register_memory",
          [](TransferEngine& e, uint64_t addr, uint64_t len, int32_t device) {
            uint64_t h = 0;
            Check(e.RegisterMemory(addr, len, device, &h));
            return h;
          },
          py::arg("addr"), py::arg("len"), py::arg("device") = -1)
      .def(
          "deregister_memory", [](TransferEngine& e, uint64_t h) { Check(e.DeregisterMemory(h)); },
          py::arg("handle"))
      .def("num_registrations", &TransferEngine::NumRegistrations)
      .def("descriptor", [](const TransferEngine& e) { return py::bytes(e.Descriptor()); })
      .def(
          "add_peer",
          [](TransferEngine& e, const py::bytes& desc, const std::string& transport) {
            const std::string blob = desc;
            uint64_t peer = 0;
            std::string chosen;
            Released([&] { return e.AddPeer(blob, transport, &peer, &chosen); });
            return py::make_tuple(peer, chosen);
          },
          py::arg("descriptor"), py::arg("transport") = "")
      .def(
          "remove_peer",
          [](TransferEngine& e, uint64_t peer) { Released([&] { return e.RemovePeer(peer); }); },
          py::arg("peer"))
      .def(
          "peer_name",
          [](const TransferEngine& e, uint64_t peer) {
            std::string name;
            Check(e.PeerName(peer, &name));
            return name;
          },
          py::arg("peer"))
      .def(
          "submit",
          [](TransferEngine& e, uint64_t peer, int op, const U64Array& local,
             const U64Array& remote, const U64Array& lens, const py::bytes& notify,
             double timeout_s, const std::string& transport, bool crc, const std::string& mode) {
            if (local.ndim() != 1 || local.size() != remote.size() || local.size() != lens.size()) {
              Check(Status::InvalidArgument("local, remote and lens must be 1-D of one length"));
            }
            std::vector<Segment> segs(local.size());
            for (py::ssize_t i = 0; i < local.size(); ++i) {
              segs[i] = {local.data()[i], remote.data()[i], lens.data()[i]};
            }
            SubmitOptions opts;
            opts.notify = notify;
            opts.timeout_s = timeout_s;
            opts.transport = transport;
            opts.crc = crc;
            opts.mode = mode;
            uint64_t batch = 0;
            Released([&] {
              return e.Submit(peer, static_cast<TransferOp>(op), std::move(segs), opts, &batch);
            });
            return batch;
          },
          py::arg("peer"), py::arg("op"), py::arg("local"), py::arg("remote"), py::arg("lens"),
          py::arg("notify") = py::bytes(""), py::arg("timeout_s") = 0.0, py::arg("transport") = "",
          py::arg("crc") = false, py::arg("mode") = "auto")
      .def(
          "poll",
          [](TransferEngine& e, uint64_t batch) {
            BatchStatus b;
            Check(e.Poll(batch, &b));
            return StatusTuple(b);
          },
          py::arg("batch"))
      .def(
          "wait",
          [](TransferEngine& e, uint64_t batch, double timeout_s) {
            BatchStatus b;
            Released([&] { return e.Wait(batch, timeout_s, &b); });
            return StatusTuple(b);
          },
          py::arg("batch"), py::arg("timeout_s"))
      .def(
          "cancel", [](TransferEngine& e, uint64_t b) { Check(e.Cancel(b)); }, py::arg("batch"))
      .def(
          "release", [](TransferEngine& e, uint64_t b) { Check(e.Release(b)); }, py::arg("batch"))
      .def("take_notifications",
           [](TransferEngine& e) { return NotificationList(e.TakeNotifications()); })
      .def(
          "wait_notifications",
          [](TransferEngine& e, double timeout_s) {
            std::vector<Notification> ns;
            Released([&] { return e.WaitNotifications(timeout_s, &ns); });
            return NotificationList(ns);
          },
          py::arg("timeout_s"))
      .def("shutdown", [](TransferEngine& e) {
        py::gil_scoped_release release;
        e.Shutdown();
      });
  m.def("live_registrations", &TransferEngine::LiveRegistrations);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  BindTransferEngine(m);
  m.doc() = "llumnix_kv native core: KV layouts, copy plans, CPU and CUDA executors";
  m.attr("NUM_STATUS_CODES") = Status::kNumCodes;

  py::class_<MemoryRegion>(m, "MemoryRegion")
      .def(py::init([](uint64_t addr, uint64_t bytes, int32_t device) {
             return MemoryRegion{addr, bytes, device};
           }),
           py::arg("addr"), py::arg("bytes"), py::arg("device") = -1)
      .def_readwrite("addr", &MemoryRegion::addr)
      .def_readwrite("bytes", &MemoryRegion::bytes)
      .def_readwrite("device", &MemoryRegion::device)
      .def("__repr__", [](const MemoryRegion& r) {
        return "MemoryRegion(addr=" + std::to_string(r.addr) +
               ", bytes=" + std::to_string(r.bytes) + ", device=" + std::to_string(r.device) + ")";
      });

  // dynamic_attr: a layout built from tensors keeps them alive in a Python attribute.
  py::class_<KvLayout>(m, "KvLayout", py::dynamic_attr())
      .def(py::init<>())
      .def(py::init<const KvLayout&>(), py::arg("other"))
      .def("__copy__", [](const KvLayout& l) { return KvLayout(l); })
      .def_readwrite("num_layers", &KvLayout::num_layers)
      .def_readwrite("num_kv", &KvLayout::num_kv)
      .def_readwrite("num_blocks", &KvLayout::num_blocks)
      .def_readwrite("block_tokens", &KvLayout::block_tokens)
      .def_readwrite("num_heads", &KvLayout::num_heads)
      .def_readwrite("head_bytes", &KvLayout::head_bytes)
      .def_readwrite("dtype", &KvLayout::dtype)
      .def_readwrite("region_layer_mult", &KvLayout::region_layer_mult)
      .def_readwrite("region_kv_mult", &KvLayout::region_kv_mult)
      .def_readwrite("layer_stride", &KvLayout::layer_stride)
      .def_readwrite("kv_stride", &KvLayout::kv_stride)
      .def_readwrite("block_stride", &KvLayout::block_stride)
      .def_readwrite("token_stride", &KvLayout::token_stride)
      .def_readwrite("head_stride", &KvLayout::head_stride)
      .def_readwrite("regions", &KvLayout::regions)
      .def("validate", [](const KvLayout& l) { Check(l.Validate()); })
      .def("region_of", &KvLayout::RegionOf, py::arg("layer"), py::arg("kv"))
      .def("offset_of", &KvLayout::OffsetOf, py::arg("layer"), py::arg("kv"), py::arg("block"),
           py::arg("token"), py::arg("head"))
      .def_property_readonly("bytes_per_token", &KvLayout::BytesPerToken)
      .def("__repr__", &KvLayout::ToString);

  py::class_<CopyPlan>(m, "CopyPlan")
      .def("__len__", &CopyPlan::size)
      .def_property_readonly("num_segments", &CopyPlan::size)
      .def_property_readonly("total_bytes", &CopyPlan::total_bytes)
      .def_property_readonly("src_region", [](const CopyPlan& p) { return ToNumpy(p.src_region); })
      .def_property_readonly("src_off", [](const CopyPlan& p) { return ToNumpy(p.src_off); })
      .def_property_readonly("dst_region", [](const CopyPlan& p) { return ToNumpy(p.dst_region); })
      .def_property_readonly("dst_off", [](const CopyPlan& p) { return ToNumpy(p.dst_off); })
      .def_property_readonly("len", [](const CopyPlan& p) { return ToNumpy(p.len); })
      .def_property_readonly("staging_off",
                             [](const CopyPlan& p) { return ToNumpy(p.staging_off); })
      .def(
          "check_bounds",
          [](const CopyPlan& p, const KvLayout* src, const KvLayout* dst) {
            Check(CheckPlanBounds(p, src, dst));
          },
          py::arg("src").none(true), py::arg("dst").none(true))
      .def("__repr__", [](const CopyPlan& p) {
        return "CopyPlan(segments=" + std::to_string(p.size()) +
               ", bytes=" + std::to_string(p.total_bytes()) + ")";
      });

  m.def(
      "plan_copy",
      [](const KvLayout& src, const KvLayout& dst, const IndexArray& src_blocks,
         const IndexArray& dst_blocks, int64_t token_begin, int64_t token_end,
         std::optional<std::pair<int32_t, int32_t>> src_heads,
         std::optional<std::pair<int32_t, int32_t>> dst_heads,
         std::optional<std::pair<int32_t, int32_t>> layers) {
        const std::vector<int32_t> sb = ToBlockTable(src_blocks, "src");
        const std::vector<int32_t> db = ToBlockTable(dst_blocks, "dst");
        CopySpec spec;
        spec.src_blocks = sb.data();
        spec.num_src_blocks = static_cast<int64_t>(sb.size());
        spec.src_heads = ToHeads(src_heads, src);
        spec.dst_blocks = db.data();
        spec.num_dst_blocks = static_cast<int64_t>(db.size());
        spec.dst_heads = ToHeads(dst_heads, dst);
        spec.token_begin = token_begin;
        spec.token_end = token_end;
        if (layers) spec.layers = {layers->first, layers->second};
        CopyPlan plan;
        Status st;
        {
          py::gil_scoped_release release;
          st = PlanCopy(src, dst, spec, &plan);
        }
        Check(st);
        return plan;
      },
      py::arg("src"), py::arg("dst"), py::arg("src_blocks"), py::arg("dst_blocks"),
      py::arg("token_begin"), py::arg("token_end"), py::arg("src_heads") = py::none(),
      py::arg("dst_heads") = py::none(), py::arg("layers") = py::none());

  m.def(
      "copy_cpu",
      [](const CopyPlan& plan, int mode, const std::vector<uint64_t>& src_bases,
         const std::vector<uint64_t>& dst_bases, uint64_t staging, uint64_t staging_bytes,
         int num_threads) {
        const CopyMode cm = ToMode(mode);
        Status st;
        {
          py::gil_scoped_release release;
          st = CopyCpu(plan, cm, MakeTarget(src_bases, dst_bases, staging, staging_bytes),
                       num_threads);
        }
        Check(st);
      },
      py::arg("plan"), py::arg("mode"), py::arg("src_bases"), py::arg("dst_bases"),
      py::arg("staging") = 0, py::arg("staging_bytes") = 0, py::arg("num_threads") = 0);

  m.def(
      "copy_cuda",
      [](const CopyPlan& plan, int mode, const std::vector<uint64_t>& src_bases,
         const std::vector<uint64_t>& dst_bases, uint64_t staging, uint64_t staging_bytes,
         uint64_t stream) {
        const CopyMode cm = ToMode(mode);
        Status st;
        {
          py::gil_scoped_release release;
          st = CopyCuda(plan, cm, MakeTarget(src_bases, dst_bases, staging, staging_bytes), stream);
        }
        Check(st);
      },
      py::arg("plan"), py::arg("mode"), py::arg("src_bases"), py::arg("dst_bases"),
      py::arg("staging") = 0, py::arg("staging_bytes") = 0, py::arg("stream") = 0);

  m.def("set_cpu_threads", &SetCpuThreads, py::arg("n"));
  m.def("cpu_threads", &CpuThreads);
  m.def("cuda_compiled", &CudaCompiled);
  m.def("cuda_build_info", &CudaBuildInfo);
  m.def("cuda_device_count", &CudaDeviceCount);
#ifdef LLUMNIX_KV_WITH_UCX
  m.def("ucx_compiled", [] { return true; });
  m.def("ucx_build_info", [] { return std::string("UCX ") + LLUMNIX_KV_UCX_SOURCE; });
#else
  m.def("ucx_compiled", [] { return false; });
  m.def("ucx_build_info", [] { return std::string(); });
#endif

  // The plain-socket baseline of `llumnix-kv bench` (llumnix_kv/transfer/raw_socket.h).
  m.def(
      "raw_socket_listen",
      [](const std::string& host) {
        int fd = -1, port = 0;
        Check(rawsock::Listen(host, &fd, &port));
        return std::make_pair(fd, port);
      },
      py::arg("host") = "127.0.0.1");
  m.def(
      "raw_socket_serve",
      [](int fd, int streams, uint64_t base, uint64_t span, double timeout_s) {
        Status st;
        {
          py::gil_scoped_release release;
          st = rawsock::Serve(fd, streams, base, span, timeout_s);
        }
        Check(st);
      },
      py::arg("fd"), py::arg("streams"), py::arg("base"), py::arg("span"),
      py::arg("timeout_s") = 60.0);
  py::class_<rawsock::Sender>(m, "RawSocketSender")
      .def(py::init([](const std::string& host, int port, int streams, double timeout_s) {
             std::unique_ptr<rawsock::Sender> s;
             Check(rawsock::Sender::Connect(host, port, streams, timeout_s, &s));
             return s;
           }),
           py::arg("host"), py::arg("port"), py::arg("streams") = 1, py::arg("timeout_s") = 60.0)
      .def(
          "send",
          [](rawsock::Sender& s, const U64Array& local, const U64Array& offset,
             const U64Array& lens) {
            if (local.size() != offset.size() || local.size() != lens.size()) {
              Check(Status::InvalidArgument("local, offset and lens differ in length"));
            }
            std::vector<rawsock::Piece> pieces(local.size());
            for (py::ssize_t i = 0; i < local.size(); ++i) {
              pieces[i] = {local.data()[i], offset.data()[i], lens.data()[i]};
            }
            Status st;
            {
              py::gil_scoped_release release;
              st = s.Send(pieces);
            }
            Check(st);
          },
          py::arg("local"), py::arg("offset"), py::arg("lens"))
      .def("close", &rawsock::Sender::Close);

  // Device memory helpers for tests and benchmarks that run without a CUDA build of torch.
  m.def(
      "cuda_malloc",
      [](uint64_t bytes, int device) {
        uint64_t p = 0;
        Check(CudaMalloc(bytes, device, &p));
        return p;
      },
      py::arg("bytes"), py::arg("device") = 0);
  m.def("cuda_free", [](uint64_t p) { Check(CudaFree(p)); }, py::arg("ptr"));
  m.def(
      "cuda_memcpy_sync",
      [](uint64_t dst, uint64_t src, uint64_t bytes) {
        Status st;
        {
          py::gil_scoped_release release;
          st = CudaMemcpyHostDevice(dst, src, bytes);
        }
        Check(st);
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"));
  m.def(
      "cuda_memcpy_async",
      [](uint64_t dst, uint64_t src, uint64_t bytes, uint64_t stream) {
        Check(CudaMemcpy(dst, src, bytes, stream));
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("stream") = 0);
  m.def(
      "cuda_synchronize",
      [](uint64_t stream) {
        Status st;
        {
          py::gil_scoped_release release;
          st = CudaStreamSynchronize(stream);
        }
        Check(st);
      },
      py::arg("stream") = 0);
}
