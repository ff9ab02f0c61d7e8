// Bindings: element conversions for `sparsellm pack` (sparsellm/convert.h). Argument checks only.
//
//   convertElements(src: Uint8Array, from: 0|1|2, dst: Uint8Array, to: 0|1|2) → undefined
//     element types: 0 F32, 1 F16, 2 BF16; dst must hold exactly as many elements as src.
//   packNeuronBlock(down: Uint8Array, downType, d, F, j0, n, up: Uint8Array | null, upType,
//                   out: Uint8Array, to) → undefined
//     the neuron-major block of neurons [j0, j0 + n) (W_up row then W_down column per neuron,
//     or only the column when up is null); down is W_down [d, F], up is [n, d].
// Buffers must be aligned to their element size and must not overlap.
#include <cstdint>
#include <string>

#include "registry.h"
#include "sparsellm/convert.h"

namespace sparsellm::addon {
namespace {

struct Bytes {
  uint8_t* data;
  size_t size;
};

Bytes bytes_arg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* what) {
  if (info.Length() <= i || !info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw_js(info.Env(), std::string(fn) + ": " + what + " must be a Uint8Array");
  Napi::Uint8Array a = info[i].As<Napi::Uint8Array>();
  return {a.Data(), a.ByteLength()};
}

ElemType type_arg(const Napi::CallbackInfo& info, size_t i, const char* fn) {
  if (info.Length() <= i || !info[i].IsNumber()) throw_js(info.Env(), std::string(fn) + ": element type must be 0 (F32), 1 (F16) or 2 (BF16)");
  const int t = info[i].As<Napi::Number>().Int32Value();
  if (t < 0 || t > 2) throw_js(info.Env(), std::string(fn) + ": element type must be 0 (F32), 1 (F16) or 2 (BF16)");
  return static_cast<ElemType>(t);
}

size_t size_arg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* what) {
  if (info.Length() <= i || !info[i].IsNumber()) throw_js(info.Env(), std::string(fn) + ": " + what + " must be a number");
  const double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0) || v != static_cast<double>(static_cast<int64_t>(v)) || v > 9007199254740991.0)
    throw_js(info.Env(), std::string(fn) + ": " + what + " must be a non-negative integer");
  return static_cast<size_t>(v);
}

void check_aligned(Napi::Env env, const Bytes& b, ElemType t, const char* fn, const char* what) {
  const size_t e = elem_size(t);
  if (reinterpret_cast<uintptr_t>(b.data) % e != 0) throw_js(env, std::string(fn) + ": " + what + " is not aligned to its element size");
  if (b.size % e != 0) throw_js(env, std::string(fn) + ": " + what + " is not a whole number of elements");
}

bool overlap(const Bytes& a, const Bytes& b) { return a.size && b.size && a.data < b.data + b.size && b.data < a.data + a.size; }

Napi::Value ConvertElements(const Napi::CallbackInfo& info) {
  const char* fn = "convertElements";
  const Bytes src = bytes_arg(info, 0, fn, "src");
  const ElemType from = type_arg(info, 1, fn);
  const Bytes dst = bytes_arg(info, 2, fn, "dst");
  const ElemType to = type_arg(info, 3, fn);
  check_aligned(info.Env(), src, from, fn, "src");
  check_aligned(info.Env(), dst, to, fn, "dst");
  const size_t n = src.size / elem_size(from);
  if (dst.size != n * elem_size(to)) throw_js(info.Env(), std::string(fn) + ": dst has " + std::to_string(dst.size) + " bytes, expected " + std::to_string(n * elem_size(to)));
  if (overlap(src, dst)) throw_js(info.Env(), std::string(fn) + ": src and dst overlap");
  convert_elems(src.data, from, dst.data, to, n);
  return info.Env().Undefined();
}

Napi::Value PackNeuronBlock(const Napi::CallbackInfo& info) {
  const char* fn = "packNeuronBlock";
  Napi::Env env = info.Env();
  const Bytes down = bytes_arg(info, 0, fn, "down");
  const ElemType down_type = type_arg(info, 1, fn);
  const size_t d = size_arg(info, 2, fn, "d");
  const size_t F = size_arg(info, 3, fn, "F");
  const size_t j0 = size_arg(info, 4, fn, "j0");
  const size_t n = size_arg(info, 5, fn, "n");
  const bool has_up = info.Length() > 6 && !info[6].IsNull() && !info[6].IsUndefined();
  Bytes up{nullptr, 0};
  if (has_up) up = bytes_arg(info, 6, fn, "up");
  const ElemType up_type = type_arg(info, 7, fn);
  const Bytes out = bytes_arg(info, 8, fn, "out");
  const ElemType to = type_arg(info, 9, fn);
  check_aligned(env, down, down_type, fn, "down");
  if (has_up) check_aligned(env, up, up_type, fn, "up");
  check_aligned(env, out, to, fn, "out");
  if (j0 > F || n > F - j0) throw_js(env, std::string(fn) + ": neurons [j0, j0 + n) outside [0, F)");
  if (down.size != d * F * elem_size(down_type)) throw_js(env, std::string(fn) + ": down is not [d, F]");
  if (has_up && up.size != n * d * elem_size(up_type)) throw_js(env, std::string(fn) + ": up is not [n, d]");
  if (out.size != n * (has_up ? 2 : 1) * d * elem_size(to)) throw_js(env, std::string(fn) + ": out has the wrong size");
  if (overlap(out, down) || (has_up && overlap(out, up))) throw_js(env, std::string(fn) + ": out overlaps an input");
  pack_neuron_block(down.data, down_type, d, F, j0, n, has_up ? up.data : nullptr, up_type, out.data, to);
  return env.Undefined();
}

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("convertElements", Napi::Function::New(env, ConvertElements));
  exports.Set("packNeuronBlock", Napi::Function::New(env, PackNeuronBlock));
});

}  // namespace
}  // namespace sparsellm::addon
