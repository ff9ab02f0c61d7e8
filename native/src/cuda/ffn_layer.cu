// CudaFfnLayer: one FFN block on the GPU (dense, TwELL sparse with exact row fallback, auto;
// decode for a few tokens). Orchestration only; the kernels are in gemm.cu, twell.cu and
// twell_updown.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

// GPU rates of the auto cost model (docs/kernels.md, "CUDA"): the fused kernel streams each active
// neuron's rows mostly from L2; the dense GEMMs run near the tensor-core rate.
constexpr double kSparseBytesPerS = 4e12;
constexpr double kGemmFlopsPerS = 3e14;

}  // namespace

struct CudaFfnLayer::Impl {
  FfnLayerConfig cfg;
  int64_t d = 0, F = 0, dp = 0, Fp = 0;
  bool gated = true, generic = false;
  DeviceBuffer act;      // gated: W_gate [F, dp]; non-gated: W_up [F, dp]
  DeviceBuffer rows;     // gated: updown [F, 2, dp]; non-gated: down_t [F, dp]
  DeviceBuffer down_std;  // W_down [d, Fp]
  DeviceBuffer up_bias, down_bias;
  DeviceBuffer x_f32, x_bf16, y, count, entries, stats, of_rows, G, H, xo, yo, gdec;
  DeviceTwell tw;
  int64_t last_fallback = 0;

  const uint16_t* act_w() const { return act.as<uint16_t>(); }
  const uint16_t* up_rows() const { return gated ? rows.as<uint16_t>() : nullptr; }
  const uint16_t* down_rows() const { return gated ? rows.as<uint16_t>() + dp : rows.as<uint16_t>(); }
  int64_t ldw_rows() const { return gated ? 2 * dp : dp; }
  const float* ubias() const { return up_bias.bytes() && !gated && has_up_bias ? up_bias.as<float>() : nullptr; }
  const float* dbias() const { return has_down_bias ? down_bias.as<float>() : nullptr; }
  bool has_up_bias = false, has_down_bias = false;

  // y[M, d] (ldy) = dense FFN of x bf16 [M, dp]: GEMMs, or GEMVs for a few rows.
  void dense(const uint16_t* x, int64_t M, float* yv, int64_t ldy) {
    G.reserve(static_cast<size_t>(M * Fp) * 2);
    H.reserve(static_cast<size_t>(M * Fp) * 2);
    auto mm = M <= kGemvMaxRows ? gemv_bf16 : gemm_bf16;
    Epilogue e;
    e.out_bf16 = true;
    e.ldo = Fp;
    if (gated) {
      e.op = EpiOp::Relu;
      e.out = G.data();
      mm(x, dp, act_w(), dp, M, F, d, e);
      e.op = EpiOp::MulAux;
      e.aux = G.as<uint16_t>();
      e.ldaux = Fp;
      e.out = H.data();
      mm(x, dp, up_rows(), 2 * dp, M, F, d, e);
    } else {
      e.op = EpiOp::Relu;
      e.bias = ubias();
      e.out = H.data();
      mm(x, dp, act_w(), dp, M, F, d, e);
    }
    Epilogue o;
    o.bias = dbias();
    o.out = yv;
    o.ldo = ldy;
    mm(H.as<uint16_t>(), Fp, down_std.as<uint16_t>(), Fp, M, d, F, o);
  }

  TwellDeviceStats read_stats() {
    TwellDeviceStats s{};
    download(&s, stats.data(), sizeof s);
    return s;
  }

  static void to_stats(const TwellDeviceStats& s, int64_t M, FfnStats& st) {
    st.rows = M;
    st.nnz = static_cast<int64_t>(s.nnz);
    st.max_row_nnz = static_cast<int64_t>(s.max_row_nnz);
    st.overflow_tiles = static_cast<int64_t>(s.overflow_tiles);
    st.overflow_rows = static_cast<int64_t>(s.overflow_rows);
  }

  bool prefer_dense(const FfnStats& s, int64_t M) const {
    const double mats = gated ? 2.0 : 1.0;
    const double sparse = static_cast<double>(s.nnz) * mats * static_cast<double>(d) * 2.0 / kSparseBytesPerS;
    const double dense_t = mats * 2.0 * static_cast<double>(M) * static_cast<double>(d) * static_cast<double>(F) / kGemmFlopsPerS;
    return sparse > cfg.auto_crossover * dense_t;
  }
};

CudaFfnLayer::CudaFfnLayer(const FfnLayerConfig& cfg, const float* gate, const float* up, const float* down,
                           const float* up_bias, const float* down_bias)
    : impl_(std::make_unique<Impl>()) {
  require_device();
  Impl& L = *impl_;
  L.cfg = cfg;
  L.cfg.dtype = DType::BF16;
  L.d = cfg.d_model;
  L.F = cfg.d_ff;
  L.gated = cfg.gated;
  if (L.d < 1 || L.F < 1) throw std::invalid_argument("CudaFfnLayer: d_model and d_ff must be positive");
  if (L.F > 65535 * int64_t(65536)) throw std::invalid_argument("CudaFfnLayer: d_ff too large");
  if (!twell_tile_supported(cfg.twell.tile))
    throw std::invalid_argument("CudaFfnLayer: TwELL tile width " + std::to_string(cfg.twell.tile) +
                                " is not supported on CUDA (32, 64, 128 or 256)");
  if (cfg.twell.compression < 1 || cfg.twell.capacity() < 1)
    throw std::invalid_argument("CudaFfnLayer: TwELL capacity tile/compression - 1 must be at least 1");
  if ((L.gated && !gate) || !up || !down) throw std::invalid_argument("CudaFfnLayer: missing weights");
  L.dp = round8(L.d);
  L.Fp = round8(L.F);
  const int64_t d = L.d, F = L.F, dp = L.dp, Fp = L.Fp;
  auto bf = [](float v) { return f32_to_bf16(v); };
  const float* act = L.gated ? gate : up;
  std::vector<uint16_t> h(static_cast<size_t>(F * dp), 0);
  for (int64_t j = 0; j < F; ++j)
    for (int64_t k = 0; k < d; ++k) h[j * dp + k] = bf(act[j * d + k]);
  L.act.reserve(h.size() * 2);
  upload(L.act.data(), h.data(), h.size() * 2);
  if (L.gated) {
    std::vector<uint16_t> ud(static_cast<size_t>(F * 2 * dp), 0);
    for (int64_t j = 0; j < F; ++j)
      for (int64_t k = 0; k < d; ++k) {
        ud[(j * 2) * dp + k] = bf(up[j * d + k]);
        ud[(j * 2 + 1) * dp + k] = bf(down[k * F + j]);
      }
    L.rows.reserve(ud.size() * 2);
    upload(L.rows.data(), ud.data(), ud.size() * 2);
  } else {
    std::vector<uint16_t> dt(static_cast<size_t>(F * dp), 0);
    for (int64_t j = 0; j < F; ++j)
      for (int64_t k = 0; k < d; ++k) dt[j * dp + k] = bf(down[k * F + j]);
    L.rows.reserve(dt.size() * 2);
    upload(L.rows.data(), dt.data(), dt.size() * 2);
  }
  std::vector<uint16_t> ds(static_cast<size_t>(d * Fp), 0);
  for (int64_t k = 0; k < d; ++k)
    for (int64_t j = 0; j < F; ++j) ds[k * Fp + j] = bf(down[k * F + j]);
  L.down_std.reserve(ds.size() * 2);
  upload(L.down_std.data(), ds.data(), ds.size() * 2);
  if (up_bias && !L.gated) {
    L.has_up_bias = true;
    L.up_bias.reserve(F * 4);
    upload(L.up_bias.data(), up_bias, F * 4);
  } else if (up_bias) {
    throw std::invalid_argument("CudaFfnLayer: up_bias is for non-gated layers");
  }
  if (down_bias) {
    L.has_down_bias = true;
    L.down_bias.reserve(d * 4);
    upload(L.down_bias.data(), down_bias, d * 4);
  }
  L.stats.reserve(sizeof(TwellDeviceStats));
  synchronize();
}

CudaFfnLayer::~CudaFfnLayer() = default;

const FfnLayerConfig& CudaFfnLayer::config() const { return impl_->cfg; }
int64_t CudaFfnLayer::weight_bytes() const {
  return (impl_->gated ? 3 : 2) * impl_->d * impl_->F * 2;
}
int64_t CudaFfnLayer::device_bytes() const {
  const Impl& L = *impl_;
  return static_cast<int64_t>(L.act.bytes() + L.rows.bytes() + L.down_std.bytes() + L.up_bias.bytes() +
                              L.down_bias.bytes());
}
int64_t CudaFfnLayer::d_padded() const { return impl_->dp; }
void CudaFfnLayer::set_generic_kernels(bool on) { impl_->generic = on; }
CudaFfnLayer::Weights CudaFfnLayer::device_weights() const {
  const Impl& L = *impl_;
  Weights w;
  w.act = L.act.as<uint16_t>();
  w.rows = L.rows.as<uint16_t>();
  w.down_std = L.down_std.as<uint16_t>();
  w.d = L.d;
  w.F = L.F;
  w.dp = L.dp;
  w.Fp = L.Fp;
  w.gated = L.gated;
  return w;
}
DeviceTwell CudaFfnLayer::last_twell() const { return impl_->tw; }
int64_t CudaFfnLayer::last_fallback_rows() const { return impl_->last_fallback; }

FfnStats CudaFfnLayer::forward_device(const uint16_t* x, int64_t M, float* y, FfnMode mode, bool want_stats) {
  Impl& L = *impl_;
  FfnStats st;
  st.rows = M;
  L.last_fallback = 0;
  if (M < 0) throw std::invalid_argument("CudaFfnLayer.forward: negative token count");
  if (M == 0) return st;
  if (mode == FfnMode::Dense) {
    L.dense(x, M, y, L.d);
    st.path = FfnPath::Dense;
    if (want_stats) {
      count_positive_bf16(L.gated ? L.G.as<uint16_t>() : L.H.as<uint16_t>(), L.Fp, M, L.F,
                          L.stats.as<TwellDeviceStats>());
      Impl::to_stats(L.read_stats(), M, st);
      st.overflow_tiles = st.overflow_rows = 0;
    }
    return st;
  }
  // TwELL gate GEMM (ReLU + packing in the epilogue), then the counts.
  const TwellParams& p = L.cfg.twell;
  L.tw.rows = M;
  L.tw.cols = L.F;
  L.tw.tile = p.tile;
  L.tw.cap = p.capacity();
  L.tw.tiles = ceil_div(L.F, p.tile);
  L.count.reserve(static_cast<size_t>(M * L.tw.tiles) * 4);
  L.entries.reserve(static_cast<size_t>(M * L.tw.tiles * L.tw.cap) * 4);
  L.of_rows.reserve(static_cast<size_t>(M) * 4);
  L.tw.count = L.count.as<int32_t>();
  L.tw.entries = L.entries.as<uint32_t>();
  twell_gate_bf16(x, L.dp, L.act_w(), L.dp, M, L.F, L.d, L.ubias(), L.tw);
  twell_finalize(L.tw, L.stats.as<TwellDeviceStats>(), L.of_rows.as<int32_t>());
  // One small read-back: the overflow count sizes the fallback (and gives the statistics).
  Impl::to_stats(L.read_stats(), M, st);
  (void)want_stats;
  if (mode == FfnMode::Auto && L.prefer_dense(st, M)) {
    L.dense(x, M, y, L.d);
    st.path = FfnPath::Dense;
    return st;
  }
  st.path = FfnPath::Sparse;
  twell_updown_bf16(x, L.dp, L.tw, L.up_rows(), L.down_rows(), L.ldw_rows(), L.d, L.dbias(), y, L.d, L.generic);
  const int64_t R = st.overflow_rows;
  if (R > 0) {
    // Rows with an overflowing tile: recomputed exactly by the dense GEMMs on just those rows.
    L.xo.reserve(static_cast<size_t>(R * L.dp) * 2);
    L.yo.reserve(static_cast<size_t>(R * L.d) * 4);
    gather_rows_bf16(x, L.dp, L.of_rows.as<int32_t>(), R, L.dp, L.xo.as<uint16_t>(), L.dp);
    L.dense(L.xo.as<uint16_t>(), R, L.yo.as<float>(), L.d);
    scatter_rows_f32(L.yo.as<float>(), L.d, L.of_rows.as<int32_t>(), R, L.d, y, L.d);
    L.last_fallback = R;
  }
  return st;
}

FfnStats CudaFfnLayer::decode_device(const uint16_t* x, int64_t M, float* y, FfnMode mode) {
  Impl& L = *impl_;
  if (M > kGemvMaxRows) return forward_device(x, M, y, mode, true);
  FfnStats st;
  st.rows = M;
  L.last_fallback = 0;
  if (M <= 0) return st;
  if (mode == FfnMode::Dense) {
    L.dense(x, M, y, L.d);
    st.path = FfnPath::Dense;
    return st;
  }
  // Gate GEMV (ReLU'd, f32), then only the active neurons' rows are read.
  L.gdec.reserve(static_cast<size_t>(M * L.F) * 4);
  Epilogue e;
  e.op = EpiOp::Relu;
  e.bias = L.ubias();
  e.out = L.gdec.data();
  e.ldo = L.F;
  gemv_bf16(x, L.dp, L.act_w(), L.dp, M, L.F, L.d, e);
  decode_sparse_bf16(x, L.dp, M, L.gdec.as<float>(), L.F, L.F, L.up_rows(), L.down_rows(), L.ldw_rows(), L.d, L.dbias(),
                     y, L.d);
  st.path = FfnPath::Sparse;
  return st;
}

namespace {
FfnStats host_call(CudaFfnLayer& layer, DeviceBuffer& xf, DeviceBuffer& xb, DeviceBuffer& yb, const float* x, int64_t M,
                   int64_t d, float* y, bool decode, FfnMode mode) {
  if (M <= 0) return FfnStats{};
  const int64_t dp = layer.d_padded();
  xf.reserve(static_cast<size_t>(M * d) * 4);
  xb.reserve(static_cast<size_t>(M * dp) * 2);
  yb.reserve(static_cast<size_t>(M * d) * 4);
  upload(xf.data(), x, static_cast<size_t>(M * d) * 4);
  if (dp != d) memset_device(xb.data(), 0, static_cast<size_t>(M * dp) * 2);
  f32_to_bf16_device(xf.as<float>(), d, xb.as<uint16_t>(), dp, M, d);
  FfnStats st = decode ? layer.decode_device(xb.as<uint16_t>(), M, yb.as<float>(), mode)
                       : layer.forward_device(xb.as<uint16_t>(), M, yb.as<float>(), mode, true);
  download(y, yb.data(), static_cast<size_t>(M * d) * 4);
  return st;
}
}  // namespace

FfnStats CudaFfnLayer::forward(const float* x, int64_t M, float* y, FfnMode mode) {
  return host_call(*this, impl_->x_f32, impl_->x_bf16, impl_->y, x, M, impl_->d, y, false, mode);
}

FfnStats CudaFfnLayer::decode(const float* x, int64_t M, float* y, FfnMode mode) {
  Impl& L = *impl_;
  FfnStats st = host_call(*this, L.x_f32, L.x_bf16, L.y, x, M, L.d, y, true, mode);
  if (M > 0 && M <= kGemvMaxRows && st.path == FfnPath::Sparse) {
    // Statistics from the decode gate (a few rows: read back and counted here).
    std::vector<float> g(static_cast<size_t>(M * L.F));
    download(g.data(), L.gdec.data(), g.size() * 4);
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = 0;
      for (int64_t j = 0; j < L.F; ++j) n += g[m * L.F + j] > 0.f;
      st.nnz += n;
      st.max_row_nnz = std::max(st.max_row_nnz, n);
    }
  }
  return st;
}

}  // namespace sparsellm::cuda
