// Packing conversions (sparsellm/convert.h) against the scalar references, under every ISA the
// CPU has: f32 → bf16/f16 over every high half-word with low half-words that hit each rounding
// boundary (ties, just above/below, NaN payloads, Inf, subnormals, overflow); f16/bf16 → any
// type over all 65536 patterns; the neuron-major block gather against a naive loop on random
// bit patterns of awkward sizes, with threads. Also spot checks of the references themselves.
#include <cstring>
#include <vector>

#include "check.h"
#include "sparsellm/convert.h"
#include "sparsellm/cpu_info.h"

using namespace sparsellm;

namespace {

uint32_t ref_to_f32(uint32_t bits, ElemType from) {
  if (from == ElemType::F32) return bits;
  if (from == ElemType::BF16) return bf16_to_f32_ref(static_cast<uint16_t>(bits));
  return f16_to_f32_ref(static_cast<uint16_t>(bits));
}

// The reference conversion of one element (same type: the bits unchanged).
uint32_t ref_convert(uint32_t bits, ElemType from, ElemType to) {
  if (from == to) return bits;
  const uint32_t f = ref_to_f32(bits, from);
  if (to == ElemType::F32) return f;
  return to == ElemType::BF16 ? f32_to_bf16_ref(f) : f32_to_f16_ref(f);
}

uint32_t load(const std::vector<uint8_t>& v, size_t i, ElemType t) {
  if (t == ElemType::F32) {
    uint32_t x;
    std::memcpy(&x, v.data() + 4 * i, 4);
    return x;
  }
  uint16_t x;
  std::memcpy(&x, v.data() + 2 * i, 2);
  return x;
}

void store(std::vector<uint8_t>& v, size_t i, ElemType t, uint32_t x) {
  if (t == ElemType::F32) std::memcpy(v.data() + 4 * i, &x, 4);
  else {
    const uint16_t h = static_cast<uint16_t>(x);
    std::memcpy(v.data() + 2 * i, &h, 2);
  }
}

const char* tname(ElemType t) { return t == ElemType::F32 ? "F32" : t == ElemType::F16 ? "F16" : "BF16"; }

const ElemType TYPES[] = {ElemType::F32, ElemType::F16, ElemType::BF16};

void spot_checks() {
  // bf16: ties to even, NaN quieted, Inf kept.
  CHECK(f32_to_bf16_ref(0x3f808000u) == 0x3f80, "tie to even (down)");
  CHECK(f32_to_bf16_ref(0x3f818000u) == 0x3f82, "tie to even (up)");
  CHECK(f32_to_bf16_ref(0x3f808001u) == 0x3f81, "above the tie");
  CHECK(f32_to_bf16_ref(0x7f800001u) == 0x7fc0, "signalling NaN → quiet NaN");
  CHECK(f32_to_bf16_ref(0xff800000u) == 0xff80, "-Inf");
  CHECK(f32_to_bf16_ref(0x7f7fffffu) == 0x7f80, "max float rounds to Inf");
  // f16: 65504 max, 65520 → Inf, 2^-24 smallest subnormal, 2^-25 tie to 0, 3·2^-25 → 2^-23.
  CHECK(f32_to_f16_ref(0x477fe000u) == 0x7bff, "65504");
  CHECK(f32_to_f16_ref(0x477ff000u) == 0x7c00, "65520 → Inf");
  CHECK(f32_to_f16_ref(0x33800000u) == 0x0001, "2^-24");
  CHECK(f32_to_f16_ref(0x33000000u) == 0x0000, "2^-25 ties to 0");
  CHECK(f32_to_f16_ref(0x33c00000u) == 0x0002, "3·2^-25 ties to 2·2^-24");
  CHECK(f32_to_f16_ref(0xff800000u) == 0xfc00, "-Inf");
  CHECK(f32_to_f16_ref(0x7fa00000u) == 0x7f00, "NaN payload top bits, quiet");
  CHECK(f16_to_f32_ref(0x0001) == 0x33800000u, "f16 smallest subnormal");
  CHECK(f16_to_f32_ref(0x03ff) == 0x387fc000u, "f16 largest subnormal");
  CHECK(f16_to_f32_ref(0x7c01) == 0x7fc02000u, "f16 NaN → quiet f32 NaN with payload");
  CHECK(f16_to_f32_ref(0xfc00) == 0xff800000u, "f16 -Inf");
  // f16 → f32 → f16 round trip is the identity except NaNs (quieted).
  for (uint32_t h = 0; h < 65536; ++h) {
    const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
    const uint16_t back = f32_to_f16_ref(f16_to_f32_ref(static_cast<uint16_t>(h)));
    if (!nan) CHECK(back == h, "f16 round trip %#x → %#x", h, back);
    else CHECK(back == (h | 0x200), "f16 NaN round trip %#x → %#x", h, back);
  }
}

// f32 → 16-bit over every high half with boundary low halves.
void f32_narrowing(std::mt19937_64& rng) {
  std::vector<uint32_t> lows = {0x0000, 0xffff};
  for (int k = 1; k < 16; ++k) {
    lows.push_back((1u << k) - 1);
    lows.push_back(1u << k);
    lows.push_back((1u << k) + 1);
  }
  for (int r = 0; r < 8; ++r) lows.push_back(static_cast<uint32_t>(rng()) & 0xffff);
  const size_t n = lows.size() << 16;
  std::vector<uint8_t> src(n * 4);
  for (uint32_t hi = 0; hi < 65536; ++hi)
    for (size_t l = 0; l < lows.size(); ++l) store(src, hi * lows.size() + l, ElemType::F32, (hi << 16) | lows[l]);
  for (ElemType to : {ElemType::BF16, ElemType::F16}) {
    std::vector<uint8_t> dst(n * 2);
    convert_elems(src.data(), ElemType::F32, dst.data(), to, n);
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t x = load(src, i, ElemType::F32);
      const uint32_t got = load(dst, i, to), want = ref_convert(x, ElemType::F32, to);
      if (got != want && bad++ < 5) CHECK(got == want, "F32 %#010x → %s: got %#06x, want %#06x (isa %s)", x, tname(to), got, want, isa_name(active_isa()));
    }
    CHECK(bad == 0, "%zu mismatches F32 → %s (isa %s)", bad, tname(to), isa_name(active_isa()));
  }
}

// 16-bit sources: all 65536 patterns into every type.
void sixteen_bit_sources() {
  std::vector<uint8_t> src(65536 * 2);
  for (uint32_t h = 0; h < 65536; ++h) store(src, h, ElemType::F16, h);
  for (ElemType from : {ElemType::F16, ElemType::BF16}) {
    for (ElemType to : TYPES) {
      std::vector<uint8_t> dst(65536 * elem_size(to));
      convert_elems(src.data(), from, dst.data(), to, 65536);
      size_t bad = 0;
      for (uint32_t h = 0; h < 65536; ++h) {
        const uint32_t got = load(dst, h, to), want = ref_convert(h, from, to);
        if (got != want && bad++ < 5) CHECK(got == want, "%s %#06x → %s: got %#x, want %#x (isa %s)", tname(from), h, tname(to), got, want, isa_name(active_isa()));
      }
      CHECK(bad == 0, "%zu mismatches %s → %s (isa %s)", bad, tname(from), tname(to), isa_name(active_isa()));
    }
  }
}

// Large random conversions (2 threads) and the neuron-major gather, for every type pair.
void blocks(std::mt19937_64& rng) {
  const size_t big = (size_t(1) << 19) + 37;
  for (ElemType from : TYPES) {
    std::vector<uint8_t> src(big * elem_size(from));
    for (auto& b : src) b = static_cast<uint8_t>(rng());
    for (ElemType to : TYPES) {
      std::vector<uint8_t> dst(big * elem_size(to));
      convert_elems(src.data(), from, dst.data(), to, big, 2);
      size_t bad = 0;
      for (size_t i = 0; i < big; ++i) bad += load(dst, i, to) != ref_convert(load(src, i, from), from, to);
      CHECK(bad == 0, "%zu mismatches in a %zu-element %s → %s conversion (isa %s)", bad, big, tname(from), tname(to), isa_name(active_isa()));
    }
  }
  struct Shape { size_t d, F, j0, n; };
  const Shape shapes[] = {{300, 77, 5, 61}, {257, 1031, 0, 1031}, {64, 40, 39, 1}, {1, 9, 3, 4}};
  for (const Shape& s : shapes) {
    for (ElemType dt : TYPES) {
      std::vector<uint8_t> down(s.d * s.F * elem_size(dt));
      for (auto& b : down) b = static_cast<uint8_t>(rng());
      for (ElemType ut : TYPES) {
        std::vector<uint8_t> up(s.n * s.d * elem_size(ut));
        for (auto& b : up) b = static_cast<uint8_t>(rng());
        for (ElemType to : TYPES) {
          for (bool gated : {true, false}) {
            const size_t per = (gated ? 2 : 1) * s.d;
            std::vector<uint8_t> out(s.n * per * elem_size(to), 0xab);
            pack_neuron_block(down.data(), dt, s.d, s.F, s.j0, s.n, gated ? up.data() : nullptr, ut, out.data(), to, s.F > 1000 ? 2 : 1);
            size_t bad = 0;
            for (size_t j = 0; j < s.n; ++j) {
              for (size_t r = 0; r < s.d; ++r) {
                if (gated) bad += load(out, j * per + r, to) != ref_convert(load(up, j * s.d + r, ut), ut, to);
                bad += load(out, j * per + (gated ? s.d : 0) + r, to) != ref_convert(load(down, r * s.F + s.j0 + j, dt), dt, to);
              }
            }
            CHECK(bad == 0, "%zu mismatches: block d %zu F %zu j0 %zu n %zu, down %s up %s → %s, %s (isa %s)", bad, s.d, s.F, s.j0, s.n, tname(dt), tname(ut), tname(to),
                  gated ? "updown" : "down_t", isa_name(active_isa()));
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(check::test_seed());
  spot_checks();
  const CpuInfo& cpu = cpu_info();
  std::vector<Isa> isas = {Isa::Portable};
  if (cpu.avx2_fma) isas.push_back(Isa::Avx2);
  if (cpu.avx512) isas.push_back(Isa::Avx512);
  for (Isa isa : isas) {
    set_isa_limit(isa);
    std::fprintf(stderr, "isa %s\n", isa_name(active_isa()));
    f32_narrowing(rng);
    sixteen_bit_sources();
    blocks(rng);
  }
  return check::finish("test_convert");
}
