// Transformer pieces (sparsellm/model.h) against float64 references written here, on fresh
// random inputs of awkward sizes. Tolerances: the engine computes in f32 (weights widened from
// bf16 exactly), so the relative error is a few f32 roundings per reduction: 1e-5 for norms
// and positions, 2e-5 for attention (a softmax and two reductions over up to ~100 keys),
// 2e-6 for element-wise functions.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/model.h"

using namespace sparsellm;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(check::test_seed());
  return r;
}

std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

double widen(const WeightView& w, int64_t r, int64_t c) {
  if (w.dtype == DType::F32) return static_cast<const float*>(w.data)[r * w.ld + c];
  return bf16_to_f32(static_cast<const uint16_t*>(w.data)[r * w.ld + c]);
}

// MappedFile: mapped and resident (huge-page memory) views of a file hold its bytes exactly
// (a size that is not a multiple of the 2 MiB page, nor of 4 KiB, read in several pieces); a missing file is refused
// with its name.
void test_mapped_file() {
  char path[] = "/tmp/sparsellm-test-mapped-XXXXXX";
  const int fd = ::mkstemp(path);
  CHECK(fd >= 0, "mkstemp failed");
  if (fd < 0) return;
  std::vector<uint8_t> bytes((size_t(37) << 20) + 4099);  // several 16 MiB reads
  for (auto& b : bytes) b = static_cast<uint8_t>(rng()());
  CHECK(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()), "short write");
  ::close(fd);
  for (Residency r : {Residency::Map, Residency::Resident}) {
    MappedFile f(path, r);
    CHECK(f.size() == static_cast<int64_t>(bytes.size()) && f.residency() == r, "size or residency wrong");
    CHECK(std::memcmp(f.data(), bytes.data(), bytes.size()) == 0, "residency %d: bytes differ", static_cast<int>(r));
  }
  ::unlink(path);
  for (Residency r : {Residency::Map, Residency::Resident}) {
    std::string msg;
    try {
      MappedFile f(path, r);
    } catch (const std::runtime_error& e) {
      msg = e.what();
    }
    CHECK(msg.find(path) != std::string::npos && msg.find("cannot open") != std::string::npos,
          "missing file: message '%s'", msg.c_str());
  }
}

void test_embeddings() {
  for (DType dt : {DType::F32, DType::BF16}) {
    const int64_t vocab = 37, d = 29, ld = 31, T = 11, ldo = 33, offset = 2, pos0 = 5, npos = 20;
    auto tf = randn(vocab * ld), pf = randn(npos * ld);
    auto tb = to_bf16(tf), pb = to_bf16(pf);
    WeightView table{dt == DType::F32 ? static_cast<const void*>(tf.data()) : tb.data(), dt, vocab, d, ld};
    WeightView pos{dt == DType::F32 ? static_cast<const void*>(pf.data()) : pb.data(), dt, npos, d, ld};
    std::vector<int32_t> tokens(T);
    for (auto& t : tokens) t = static_cast<int32_t>(rng()() % vocab);
    tokens[0] = 0;
    tokens[T - 1] = static_cast<int32_t>(vocab - 1);
    std::vector<float> out(T * ldo, 7.f);
    embed_tokens(table, tokens.data(), T, out.data(), ldo);
    add_learned_positions(pos, pos0, offset, T, out.data(), ldo);
    double max_err = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) {
        double ref = widen(table, tokens[t], i) + widen(pos, pos0 + t + offset, i);
        max_err = std::max(max_err, std::fabs(out[t * ldo + i] - ref));
      }
    CHECK(max_err < 1e-5, "embedding + positions (%s): max abs error %g", dt == DType::F32 ? "f32" : "bf16",
          max_err);
    CHECK(out[ldo - 1] == 7.f, "embedding wrote past the row width");
  }
}

void test_norms() {
  for (int64_t T : {1, 7, 130}) {
    const int64_t d = 203, ldx = 211;
    auto x = randn(T * ldx, 3.f);
    for (int64_t i = 0; i < d; ++i) x[i] += 5.f;  // a row with a large mean
    auto w = randn(d), b = randn(d);
    const float eps = 1e-5f;
    std::vector<float> y(T * ldx), z(T * ldx);
    rms_norm(x.data(), ldx, T, d, w.data(), eps, y.data(), ldx);
    layer_norm(x.data(), ldx, T, d, w.data(), b.data(), eps, z.data(), ldx);
    std::vector<double> ry(T * d), rz(T * d);
    std::vector<float> gy(T * d), gz(T * d);
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = x.data() + t * ldx;
      double ss = 0, s = 0;
      for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * xr[i], s += xr[i];
      double rms = 1.0 / std::sqrt(ss / d + eps);
      double mean = s / d, var = 0;
      for (int64_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      double r = 1.0 / std::sqrt(var / d + eps);
      for (int64_t i = 0; i < d; ++i) {
        ry[t * d + i] = xr[i] * rms * w[i];
        rz[t * d + i] = (xr[i] - mean) * r * w[i] + b[i];
        gy[t * d + i] = y[t * ldx + i];
        gz[t * d + i] = z[t * ldx + i];
      }
    }
    double ey = check::rel_error(gy.data(), ry.data(), ry.size());
    double ez = check::rel_error(gz.data(), rz.data(), rz.size());
    CHECK(ey < 1e-5, "rms_norm T=%lld: rel error %g", (long long)T, ey);
    CHECK(ez < 1e-5, "layer_norm T=%lld: rel error %g", (long long)T, ez);
    // In place gives the same result.
    auto x2 = x;
    rms_norm(x2.data(), ldx, T, d, w.data(), eps, x2.data(), ldx);
    CHECK(std::memcmp(x2.data(), y.data(), sizeof(float) * d) == 0, "rms_norm in place differs");
  }
}

void test_rope() {
  const int64_t T = 9, heads = 3, hd = 18, ldx = heads * hd + 5, pos0 = 1000;
  const double theta = 500000.0;
  auto x = randn(T * ldx);
  auto y = x;
  rope_rotate_half(y.data(), ldx, T, heads, hd, pos0, theta);
  std::vector<double> ref(T * heads * hd);
  std::vector<float> got(T * heads * hd);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < hd; ++i) {
        // Reference written as the "rotate half" formula: x·cos + rotate_half(x)·sin, with
        // frequencies repeated over the two halves.
        const int64_t j = i % (hd / 2);
        const double freq = 1.0 / std::pow(theta, double(2 * j) / hd);
        const double ang = double(pos0 + t) * freq;
        const float* xh = x.data() + t * ldx + h * hd;
        const double rot = i < hd / 2 ? -double(xh[i + hd / 2]) : double(xh[i - hd / 2]);
        ref[(t * heads + h) * hd + i] = xh[i] * std::cos(ang) + rot * std::sin(ang);
        got[(t * heads + h) * hd + i] = y[t * ldx + h * hd + i];
      }
  double e = check::rel_error(got.data(), ref.data(), ref.size());
  CHECK(e < 1e-6, "rope: rel error %g", e);
  CHECK(y[ldx - 1] == x[ldx - 1], "rope touched the padding");
  // Position 0 is the identity.
  auto z = x;
  rope_rotate_half(z.data(), ldx, 1, heads, hd, 0, theta);
  CHECK(std::memcmp(z.data(), x.data(), sizeof(float) * heads * hd) == 0, "rope at position 0 is not the identity");
}

void test_activations() {
  const int64_t T = 5, n = 77, ld = 80;
  auto x = randn(T * ld, 3.f), g = randn(T * ld);
  const ActKind kinds[] = {ActKind::Relu, ActKind::Silu, ActKind::GeluErf, ActKind::GeluTanh};
  const char* names[] = {"relu", "silu", "gelu", "gelu_tanh"};
  for (int k = 0; k < 4; ++k) {
    auto y = x, ym = x;
    activate(y.data(), ld, T, n, kinds[k]);
    activate_mul(ym.data(), ld, g.data(), ld, T, n, kinds[k]);
    std::vector<double> ref(T * n), refm(T * n);
    std::vector<float> got(T * n), gotm(T * n);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < n; ++i) {
        double v = x[t * ld + i], r;
        switch (kinds[k]) {
          case ActKind::Relu: r = v > 0 ? v : 0; break;
          case ActKind::Silu: r = v / (1 + std::exp(-v)); break;
          case ActKind::GeluErf: r = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); break;
          default: r = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
        }
        ref[t * n + i] = r;
        refm[t * n + i] = r * g[t * ld + i];
        got[t * n + i] = y[t * ld + i];
        gotm[t * n + i] = ym[t * ld + i];
      }
    double e = check::rel_error(got.data(), ref.data(), ref.size());
    double em = check::rel_error(gotm.data(), refm.data(), refm.size());
    CHECK(e < 2e-6, "%s: rel error %g", names[k], e);
    CHECK(em < 2e-6, "%s ⊙ up: rel error %g", names[k], em);
    CHECK(y[ld - 1] == x[ld - 1], "%s touched the padding", names[k]);
  }
  // gelu and gelu_tanh are different functions (the test could tell them apart).
  float a = 1.3f, b = 1.3f;
  activate(&a, 1, 1, 1, ActKind::GeluErf);
  activate(&b, 1, 1, 1, ActKind::GeluTanh);
  CHECK(a != b, "gelu forms agree exactly at 1.3: %g", a);
  auto xb = x;
  auto bias = randn(n);
  add_bias(xb.data(), ld, T, n, bias.data());
  double maxe = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < n; ++i) maxe = std::max(maxe, std::fabs(xb[t * ld + i] - (double(x[t * ld + i]) + bias[i])));
  CHECK(maxe < 1e-6, "add_bias: max error %g", maxe);
}

// Attention of T queries at pos0.. against all keys so far, in float64.
void ref_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                   int64_t n_tokens_total, int64_t heads, int64_t kv_heads, int64_t hd, int64_t pos0, int64_t T,
                   std::vector<double>& out) {
  // q [T, heads*hd] for positions pos0.., k/v [n_tokens_total, kv_heads*hd].
  out.assign(T * heads * hd, 0.0);
  const int64_t group = heads / kv_heads;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kh = h / group, n = pos0 + t + 1;
      std::vector<double> s(n);
      double mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < hd; ++i) acc += double(q[t * heads * hd + h * hd + i]) * k[j * kv_heads * hd + kh * hd + i];
        s[j] = acc / std::sqrt(double(hd));
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < hd; ++i) out[(t * heads + h) * hd + i] += s[j] / sum * v[j * kv_heads * hd + kh * hd + i];
    }
  (void)n_tokens_total;
}

// With a bf16 cache the keys and values are rounded to bf16 as they are stored: the reference
// takes the rounded values, so the tolerance stays the f32 one (a cache read as f32, or rounded
// any other way, would miss it by ~1e-3).
void test_attention(DType kv_dtype) {
  const char* kvname = kv_dtype == DType::BF16 ? "bf16" : "f32";
  struct Case { int64_t heads, kv_heads, hd; };
  // head_dim 130: two full 64-column output blocks of the decode kernel and a 2-column tail;
  // 25: a last 8-lane register holding one column (AVX2).
  const Case cases[] = {{6, 6, 20}, {6, 2, 20}, {5, 1, 34}, {8, 4, 64}, {4, 2, 130}, {3, 3, 25}};
  for (const Case& c : cases) {
    // 150 prompt tokens: several query blocks of kAttentionQueryBlock (the last one partial).
    const int64_t prefill = 150, decode = 4, total = prefill + decode, layers = 2, layer = 1;
    KvCache cache;
    cache.allocate(layers, c.kv_heads, c.hd, total + 3, kv_dtype);
    const int64_t qd = c.heads * c.hd, kd = c.kv_heads * c.hd;
    auto q = randn(total * qd, 1.5f), k = randn(total * kd, 1.5f), v = randn(total * kd);
    // Prefill: all `prefill` tokens at once (with padded leading dimensions).
    const int64_t ldq = qd + 3, ldk = kd + 1, ldo = qd + 2;
    std::vector<float> qp(prefill * ldq), kp(prefill * ldk), vp(prefill * ldk), out(total * ldo);
    for (int64_t t = 0; t < prefill; ++t) {
      std::memcpy(&qp[t * ldq], &q[t * qd], sizeof(float) * qd);
      std::memcpy(&kp[t * ldk], &k[t * kd], sizeof(float) * kd);
      std::memcpy(&vp[t * ldk], &v[t * kd], sizeof(float) * kd);
    }
    kv_cache_store(cache, layer, kp.data(), ldk, vp.data(), ldk, prefill, 0);
    attention_causal(qp.data(), ldq, prefill, c.heads, cache, layer, 0, out.data(), ldo);
    // Decode: one token at a time.
    for (int64_t t = prefill; t < total; ++t) {
      kv_cache_store(cache, layer, &k[t * kd], kd, &v[t * kd], kd, 1, t);
      attention_causal(&q[t * qd], qd, 1, c.heads, cache, layer, t, &out[t * ldo], ldo);
    }
    std::vector<double> ref;
    auto kr = k, vr = v;
    if (kv_dtype == DType::BF16)
      for (size_t i = 0; i < kr.size(); ++i) {
        kr[i] = bf16_to_f32(f32_to_bf16(kr[i]));
        vr[i] = bf16_to_f32(f32_to_bf16(vr[i]));
      }
    ref_attention(q, kr, vr, total, c.heads, c.kv_heads, c.hd, 0, total, ref);
    std::vector<float> got(total * qd);
    for (int64_t t = 0; t < total; ++t) std::memcpy(&got[t * qd], &out[t * ldo], sizeof(float) * qd);
    double e = check::rel_error(got.data(), ref.data(), ref.size());
    CHECK(e < 2e-5, "attention (%s cache) heads=%lld kv=%lld hd=%lld: rel error %g", kvname, (long long)c.heads,
          (long long)c.kv_heads, (long long)c.hd, e);
    // Prefill in chunks (later prompt parts after the first; 5 < kAttentionGemmMinTokens <= 8)
    // gives the same rows.
    KvCache c2;
    c2.allocate(layers, c.kv_heads, c.hd, total, kv_dtype);
    std::vector<float> out2(total * qd);
    int64_t a = 0;
    // (a chunk of 70 at position 24: two query blocks that also see earlier keys)
    for (int64_t len : {5, 8, 11, 70, 100}) {
      const int64_t b = std::min(total, a + len);
      if (a >= total) break;
      kv_cache_store(c2, layer, &k[a * kd], kd, &v[a * kd], kd, b - a, a);
      attention_causal(&q[a * qd], qd, b - a, c.heads, c2, layer, a, &out2[a * qd], qd);
      a = b;
    }
    double e2 = check::rel_error(out2.data(), ref.data(), ref.size());
    CHECK(e2 < 2e-5, "attention (%s cache) chunked prefill: rel error %g", kvname, e2);
  }
}

}  // namespace

int main() {
  test_mapped_file();
  const Isa best = active_isa();
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) continue;
    set_isa_limit(isa);  // the attention softmax has per-ISA builds
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      test_embeddings();
      test_norms();
      test_rope();
      test_activations();
      test_attention(DType::F32);
      test_attention(DType::BF16);
    }
  }
  return check::finish("test_model_ops");
}
