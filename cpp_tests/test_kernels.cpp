// C++ tests of the CPU kernels through the PyTorch dispatcher, on small hand-computed cases.
// Run by CTest; no Python involved.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  std::printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const at::Tensor& got, const at::Tensor& want, double tol = 1e-12) {
  return got.sizes() == want.sizes() &&
         at::allclose(got.to(at::kDouble), want.to(at::kDouble), tol, tol);
}

std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  return std::vector<c10::IValue>(stack.begin(), stack.end());
}

void test_gate_pool(bool channels_last) {
  const std::string tag = channels_last ? " (channels_last)" : " (contiguous)";
  // B=1, K=2, H=1, W=2: channel 0 = [1, 3], channel 1 = [2, 6]
  at::Tensor A = at::tensor({1.f, 3.f, 2.f, 6.f}).view({1, 2, 1, 2});
  if (channels_last) A = A.contiguous(at::MemoryFormat::ChannelsLast);
  // N=3 gates: (1,0), (0,1), (1,1)
  at::Tensor gates = at::tensor({1, 0, 0, 1, 1, 1}, at::kByte).view({1, 3, 2}).to(at::kBool);
  auto out = call("chip_ext::gate_pool", {A, gates});
  at::Tensor gated = out[0].toTensor(), z = out[1].toTensor();
  at::Tensor want_gated = at::tensor({1.f, 3.f, 0.f, 0.f,   // n=0: channel 1 off
                                      0.f, 0.f, 2.f, 6.f,   // n=1: channel 0 off
                                      1.f, 3.f, 2.f, 6.f})  // n=2: all on
                              .view({3, 2, 1, 2});
  expect(close(gated, want_gated), "gate_pool gated = A with gated channels" + tag);
  expect(!channels_last || gated.is_contiguous(at::MemoryFormat::ChannelsLast),
         "gate_pool keeps the memory format" + tag);
  // mean_hw: channel 0 -> 2, channel 1 -> 4
  at::Tensor want_z = at::tensor({2.f, 0.f, 0.f, 4.f, 2.f, 4.f}).view({1, 3, 2});
  expect(close(z, want_z), "gate_pool z = gates * mean" + tag);
  expect(z.scalar_type() == at::kFloat, "gate_pool z is float32" + tag);
}

void test_gram() {
  // One image, two perturbations, K=2, C=1.
  at::Tensor a = at::tensor({2.f, 3.f}).view({1, 2});
  at::Tensor gates = at::tensor({1, 1, 1, 0}, at::kByte).view({1, 2, 2}).to(at::kBool);
  at::Tensor h = at::tensor({1.f, 0.5f}).view({1, 2});
  at::Tensor f = at::tensor({0.5f}).view({1, 1});
  at::Tensor g = at::tensor({0.8f, 0.4f}).view({1, 2, 1});
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor G = at::zeros({1, 3}, f64), b = at::zeros({1, 2}, f64), y = at::zeros({1}, f64),
             n = at::zeros({1}, f64), zs = at::zeros({1, 2}, f64), gs = at::zeros({1}, f64);
  call("chip_ext::gram_accumulate", {G, b, y, n, zs, gs, a, gates, h, f, g});
  // z1 = (2,3) with weight f*h = 0.5; z2 = (2,0) with weight 0.25
  // G = 0.5*[[4,6],[6,9]] + 0.25*[[4,0],[0,0]] -> packed (3, 3, 4.5)
  expect(close(G, at::tensor({3.0, 3.0, 4.5}, f64).view({1, 3}), 1e-6), "gram G (packed upper triangle)");
  // b = 0.5*0.8*(2,3) + 0.25*0.4*(2,0) = (1.0, 1.2)
  expect(close(b, at::tensor({1.0, 1.2}, f64).view({1, 2}), 1e-6), "gram b");
  expect(close(y, at::tensor({0.36}, f64), 1e-6), "gram y = sum f h g^2");
  expect(close(n, at::tensor({0.75}, f64), 1e-6), "gram n = sum f h");
  // zs = 0.5*(2,3) + 0.25*(2,0) = (1.5, 1.5);  gs = 0.5*0.8 + 0.25*0.4 = 0.5
  expect(close(zs, at::tensor({1.5, 1.5}, f64).view({1, 2}), 1e-6), "gram zs = sum f h z");
  expect(close(gs, at::tensor({0.5}, f64), 1e-6), "gram gs = sum f h g");
  // A second call adds the same again.
  call("chip_ext::gram_accumulate", {G, b, y, n, zs, gs, a, gates, h, f, g});
  expect(close(n, at::tensor({1.5}, f64), 1e-6), "gram accumulates across calls");
}

void test_bad_input() {
  at::Tensor A = at::ones({2, 4, 3, 3});
  at::Tensor gates = at::ones({2, 3, 5}, at::kBool);
  std::string message;
  try {
    call("chip_ext::gate_pool", {A, gates});
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("gates must be [B, N, K] with B=2, K=4 to match A; got [2, 3, 5]") !=
             std::string::npos,
         "gate_pool rejects a K mismatch with a clear message");
}

void test_sample_gates() {
  // Images 7 and 10 (start 7, stride 3), N=3, K=6, max_drop 1, the stream of (seed 0, layer "layer4"):
  // the bits below were written by chip_ext.distillation.gates.sample_gates_reference (PyTorch ops).
  at::Tensor gates = at::empty({2, 3, 6}, at::kBool);
  call("chip_ext::sample_gates", {gates, int64_t(7366126594270202220LL), int64_t(7), int64_t(3), 1.0});
  const std::vector<int> want = {1, 1, 1, 1, 1, 1,  1, 1, 0, 0, 1, 0,  0, 0, 0, 1, 0, 0,
                                 1, 1, 1, 1, 1, 1,  1, 1, 1, 0, 0, 1,  0, 0, 0, 0, 1, 0};
  const bool* got = gates.const_data_ptr<bool>();
  bool same = true;
  for (size_t i = 0; i < want.size(); ++i) same = same && (got[i] == (want[i] == 1));
  expect(same, "sample_gates draws the gate stream of the Python reference, bit for bit");
  std::string message;
  try {
    call("chip_ext::sample_gates", {gates, int64_t(0), int64_t(0), int64_t(1), 2.0});
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("max_drop must be in [0, 1]; got 2") != std::string::npos,
         "sample_gates rejects max_drop outside [0, 1] with a clear message");
}

}  // namespace

int main() {
  test_gate_pool(false);
  test_gate_pool(true);
  test_gram();
  test_bad_input();
  test_sample_gates();
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
