// bench/attend.cpp — what one layer of kvc costs at decode: append and attend, against a
// plain Eigen fp32 implementation and against this machine's DRAM read bandwidth.
//
// Shapes: context 1K / 8K / 32K tokens (attend also 16K), head_dim 128, 8 kv heads, GQA
// group 1 and 4 (8 and 32 query heads), one layer, one sequence, single thread. Formats:
// Dense<float>, Dense<half>, Int8<>, Int8<32>, Q8_0, Q4_0, Fp8E4M3, Fp8E5M2, and
// Rotated<Q4_0> / Rotated<Int8<>> (rot_q4_0, rot_int8: a Hadamard rotation in front), and
// Bfp<16, 4> / Bfp<32, 8> (bfp16_4, bfp32_8: block floating point, identity permutation),
// and Kivi<4> / Kivi<2> (kivi4, kivi2: G = 32, R = 128, the newest tokens in fp32), and
// LowRankKeys<> (lowrank: rank 32, basis fitted to the first 512-token chunk) and Think<>
// (think: λ = 0.4, 80 of 128 key channels kept, fitted at an observe() of 16 window
// queries after the prefill); both keep the newest 128 / 32 tokens in fp32.
//
//   BM_append_prefill<Q>/context/check_finite
//                                      append `context` tokens in chunks of 512 into an
//                                      empty sequence (the pool's pages are warm: the
//                                      sequence is closed and reopened between iterations,
//                                      outside the timed region)
//   BM_append_decode<Q>/context/check_finite
//                                      append one token to a sequence that holds `context`
//                                      (pool warm as above)
//   BM_attend_kvc<Q>/context/group     one decode step: 1 query token, all query heads, over
//                                      a cache already holding `context` tokens
//   BM_attend_eigen_f32/context/group  the same step done the straightforward way with Eigen
//   BM_memory_read_bandwidth           sum of a 512 MiB float array: the DRAM floor
//
// Counters (see docs/benchmarks.md):
//   tokens            context length (attend) or tokens appended per call (append)
//   bytes             K/V bytes read (attend) or stored (append) per call, as the format
//                     stores them: tokens · kv_heads · (key_bytes + value_bytes)(head_dim)
//                     (2 · head_dim · sizeof(element) for Dense; scales included). Kivi:
//                     stats().code_bytes — codes, key group parameters and the fp32 rows of
//                     the residual window (append: the codes and amortized group parameters)
//   bytes_per_second  bytes / time (SetBytesProcessed)
//   ns_per_token      seconds per token (rate counter, inverted); bench/report prints ns
//
// Input K/V/q are fp32, mean 0 and variance 1, fixed seeds. attend uses the cache's default
// options (page_tokens 64, check_finite on), which is what a user gets; append runs with
// them and, at 8K, with check_finite off (label "unchecked").
#include <kvc/kvc.hpp>

#include "machine.hpp"
#include "random.hpp"

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace {

constexpr std::size_t kv_heads = 8;
constexpr std::size_t head_dim = 128;
constexpr std::size_t prefill_chunk = 512;
constexpr std::size_t decode_appends = 8192;  // iterations of BM_append_decode

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using kvc::bench::random_floats;  // bench/random.hpp

// [kv_heads][tokens][head_dim] of the full context, one array for K and one for V.
struct Context {
  std::size_t tokens = 0;
  std::vector<float> keys, values;

  explicit Context(std::size_t n)
      : tokens(n),
        keys(random_floats(kv_heads * n * head_dim, 1)),
        values(random_floats(kv_heads * n * head_dim, 2)) {}

  // Tokens [first, first + count) of every head, as the [kv_heads][count][head_dim] view
  // append() takes (a strided window into the full array: no copy).
  kvc::View<const float, 3> window(const std::vector<float>& data, std::size_t first,
                                   std::size_t count) const {
    return {
        data.data() + first * head_dim,
        {kv_heads, count, head_dim},
        {static_cast<std::ptrdiff_t>(tokens * head_dim), static_cast<std::ptrdiff_t>(head_dim), 1}};
  }
};

// The context is shared by every benchmark of one length (rebuilding 2 × 128 MiB of random
// numbers for each one would dominate the run).
const Context& context_of(std::size_t tokens) {
  static std::unique_ptr<Context> cached;
  if (!cached || cached->tokens != tokens) {
    cached.reset();
    cached = std::make_unique<Context>(tokens);
  }
  return *cached;
}

template <class Quant>
using Cache = kvc::KvCache<kvc::evict::Full, Quant>;

kvc::Geometry geometry_for(std::size_t group) {
  return {.layers = 1, .q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
}

template <class Quant>
void fill(Cache<Quant>& cache, kvc::SequenceId sequence, const Context& context) {
  for (std::size_t first = 0; first < context.tokens; first += prefill_chunk) {
    const std::size_t count = std::min(prefill_chunk, context.tokens - first);
    cache.append(sequence, 0, context.window(context.keys, first, count),
                 context.window(context.values, first, count));
  }
}

// A quantizer that fits its key basis at observe() (ThinK) sees a window of 16 queries
// after the prefill, as a SnapKV-style host sends it; the others need nothing.
template <class Quant>
void observe_window(Cache<Quant>& cache, kvc::SequenceId sequence, std::size_t group) {
  if constexpr (kvc::FitsKeys<Quant>) {
    if constexpr (Quant::fits_on_observe) {
      constexpr std::size_t window = 16;
      const std::size_t q_heads = kv_heads * group;
      const std::vector<float> queries = random_floats(q_heads * window * head_dim, 14);
      cache.observe(sequence, 0,
                    kvc::View<const float, 3>(queries.data(), {q_heads, window, head_dim}));
    }
  }
}

// K + V bytes of one token and kv head as the format stores them (Kivi: with its share of
// a key group's parameters).
template <class Quant>
constexpr std::size_t stored_token_bytes() {
  std::size_t bytes = Quant{}.key_bytes(head_dim) + Quant{}.value_bytes(head_dim);
  if constexpr (kvc::GroupsKeys<Quant>) {
    bytes += Quant{}.key_group_bytes(head_dim) / Quant::key_group_tokens;
  }
  return bytes;
}

void set_counters(benchmark::State& state, std::size_t tokens, std::size_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["tokens"] = static_cast<double>(tokens);
  state.counters["bytes"] = static_cast<double>(bytes);
  state.counters["ns_per_token"] = benchmark::Counter(
      static_cast<double>(tokens),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// ---- append -------------------------------------------------------------------------------

// append's options: the default (check_finite on) or without the NaN/Inf scan of the input.
kvc::CacheOptions append_options(const benchmark::State& state) {
  return {.check_finite = state.range(1) != 0};
}

template <class Quant>
std::string append_label(const benchmark::State& state) {
  return std::string(Quant::name()) + (state.range(1) != 0 ? "" : " unchecked");
}

template <class Quant>
void BM_append_prefill(benchmark::State& state) {
  const auto tokens = static_cast<std::size_t>(state.range(0));
  const Context& context = context_of(tokens);
  Cache<Quant> cache(geometry_for(1), append_options(state));
  // Warm the pool once, so iterations measure encoding and page bookkeeping, not page faults.
  kvc::SequenceId sequence = cache.open_sequence();
  fill(cache, sequence, context);
  for (auto _ : state) {
    state.PauseTiming();
    cache.close(sequence);
    sequence = cache.open_sequence();
    state.ResumeTiming();
    fill(cache, sequence, context);
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, tokens * kv_heads * stored_token_bytes<Quant>());
  state.SetLabel(append_label<Quant>(state));
}

template <class Quant>
void BM_append_decode(benchmark::State& state) {
  const auto tokens = static_cast<std::size_t>(state.range(0));
  const Context& context = context_of(tokens);
  Cache<Quant> cache(geometry_for(1), append_options(state));
  // Warm the pool with more pages than the run will use, so the appends below reuse pages
  // (as in an engine's steady state) instead of faulting in fresh slabs.
  kvc::SequenceId sequence = cache.open_sequence();
  for (std::size_t held = 0; held < tokens + decode_appends + 1024; held += tokens) {
    fill(cache, sequence, context);
  }
  cache.close(sequence);
  sequence = cache.open_sequence();
  fill(cache, sequence, context);
  // A fixed number of one-token appends: each one grows the sequence, so the run is bounded
  // (8192 tokens on top of the context) rather than left to the time-based iteration count.
  const std::vector<float> key = random_floats(kv_heads * head_dim, 3);
  const std::vector<float> value = random_floats(kv_heads * head_dim, 4);
  const kvc::View<const float, 3> k(key.data(), {kv_heads, 1, head_dim});
  const kvc::View<const float, 3> v(value.data(), {kv_heads, 1, head_dim});
  for (auto _ : state) {
    cache.append(sequence, 0, k, v);
    benchmark::ClobberMemory();
  }
  set_counters(state, 1, kv_heads * stored_token_bytes<Quant>());
  state.SetLabel(append_label<Quant>(state));
}

// ---- attend -------------------------------------------------------------------------------

template <class Quant>
void BM_attend_kvc(benchmark::State& state) {
  const auto tokens = static_cast<std::size_t>(state.range(0));
  const auto group = static_cast<std::size_t>(state.range(1));
  const Context& context = context_of(tokens);
  Cache<Quant> cache(geometry_for(group));
  const kvc::SequenceId sequence = cache.open_sequence();
  fill(cache, sequence, context);
  observe_window(cache, sequence, group);

  const std::size_t q_heads = kv_heads * group;
  const std::vector<float> query = random_floats(q_heads * head_dim, 5);
  std::vector<float> output(q_heads * head_dim);
  const kvc::View<const float, 3> q(query.data(), {q_heads, 1, head_dim});
  const kvc::View<float, 3> out(output.data(), {q_heads, 1, head_dim});
  cache.attend(sequence, 0, q, out);  // warm the cache's scratch buffers
  for (auto _ : state) {
    cache.attend(sequence, 0, q, out);
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  // What attend reads: every stored byte of the layer (for Kivi the fp32 window too).
  set_counters(state, tokens, cache.stats().code_bytes);
  state.SetLabel(std::string(Quant::name()));
}

// The baseline a host without kvc would write: K and V of each kv head as an n × d
// row-major fp32 matrix; per query head: scores = K·q/√d (Eigen GEMV), a numerically safe
// softmax, out = Vᵀ·p. Note that this rereads K and V once per query head of the GQA group
// (group × the bytes that `bytes` counts); kvc reads each page once per group.
void BM_attend_eigen_f32(benchmark::State& state) {
  const auto tokens = static_cast<std::size_t>(state.range(0));
  const auto group = static_cast<std::size_t>(state.range(1));
  const Context& context = context_of(tokens);
  const auto n = static_cast<Eigen::Index>(tokens);
  const auto d = static_cast<Eigen::Index>(head_dim);
  std::vector<RowMatrix> keys(kv_heads), values(kv_heads);
  for (std::size_t h = 0; h < kv_heads; ++h) {
    keys[h] = Eigen::Map<const RowMatrix>(context.keys.data() + h * tokens * head_dim, n, d);
    values[h] = Eigen::Map<const RowMatrix>(context.values.data() + h * tokens * head_dim, n, d);
  }
  const std::size_t q_heads = kv_heads * group;
  const std::vector<float> query = random_floats(q_heads * head_dim, 5);
  RowMatrix output(static_cast<Eigen::Index>(q_heads), d);
  Eigen::VectorXf scores(n);
  const float scale = 1.0F / std::sqrt(static_cast<float>(head_dim));
  for (auto _ : state) {
    for (std::size_t head = 0; head < q_heads; ++head) {
      const std::size_t h = head / group;
      const Eigen::Map<const Eigen::VectorXf> q(query.data() + head * head_dim, d);
      scores.noalias() = keys[h] * q;
      scores *= scale;
      const float max = scores.maxCoeff();
      scores = (scores.array() - max).exp();
      scores /= scores.sum();
      output.row(static_cast<Eigen::Index>(head)).noalias() = values[h].transpose() * scores;
    }
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, tokens * kv_heads * 2 * head_dim * sizeof(float));
  state.SetLabel("eigen_f32");
}

// ---- quality --------------------------------------------------------------------------------

// What each format costs in accuracy, beside what it costs in time: one decode step (GQA 4,
// 4K context) on keys with outlier channels as real models have them (channels 3, 40, 77
// and 100 scaled ×12; otherwise N(0, 1)), values N(0, 1), queries N(0, 2²), against the
// float64 attention of the unquantized K/V. Not timed (one iteration); counters only:
//   attention_error     ‖out − out_f64‖₂ / ‖out_f64‖₂ over all query heads
//   bytes_per_token     K + V bytes of one token and kv head as stored
//   compression_vs_f16  (4 · head_dim) / bytes_per_token
// calibrated: a Bfp built with calibrate_permutation on the first 512 keys of kv head 0
// (label "+perm"); otherwise the default-constructed format.
template <class Quant, bool calibrated = false>
void BM_attend_quality(benchmark::State& state) {
  constexpr std::size_t tokens = 4096, group = 4, q_heads = kv_heads * group;
  static const auto inputs = [] {
    std::array<std::vector<float>, 3> kvq{random_floats(kv_heads * tokens * head_dim, 11),
                                          random_floats(kv_heads * tokens * head_dim, 12),
                                          random_floats(q_heads * head_dim, 13)};
    for (std::size_t row = 0; row < kv_heads * tokens; ++row) {
      for (std::size_t c : {3, 40, 77, 100}) kvq[0][row * head_dim + c] *= 12.0F;
    }
    for (float& x : kvq[2]) x *= 2.0F;
    return kvq;
  }();
  const auto& [keys, values, query] = inputs;
  Quant quantizer{};
  if constexpr (calibrated) {
    quantizer = Quant(Quant::calibrate_permutation(
        std::span<const float>(keys.data(), 512 * head_dim), 512, head_dim));
  }
  Cache<Quant> cache(geometry_for(group), {}, {}, quantizer);
  const kvc::SequenceId sequence = cache.open_sequence();
  cache.append(sequence, 0, kvc::View<const float, 3>(keys.data(), {kv_heads, tokens, head_dim}),
               kvc::View<const float, 3>(values.data(), {kv_heads, tokens, head_dim}));
  observe_window(cache, sequence, group);
  std::vector<float> output(q_heads * head_dim);
  for (auto _ : state) {
    cache.attend(sequence, 0, kvc::View<const float, 3>(query.data(), {q_heads, 1, head_dim}),
                 kvc::View<float, 3>(output.data(), {q_heads, 1, head_dim}));
    benchmark::DoNotOptimize(output.data());
  }
  double difference = 0.0, norm = 0.0;
  std::vector<double> weights(tokens);
  for (std::size_t head = 0; head < q_heads; ++head) {
    const std::size_t h = head / group;
    const float* q = query.data() + head * head_dim;
    double max = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < tokens; ++i) {
      const float* k = keys.data() + (h * tokens + i) * head_dim;
      double dot = 0.0;
      for (std::size_t c = 0; c < head_dim; ++c) dot += double(q[c]) * double(k[c]);
      weights[i] = dot / std::sqrt(double(head_dim));
      max = std::max(max, weights[i]);
    }
    double total = 0.0;
    for (double& w : weights) total += (w = std::exp(w - max));
    for (std::size_t c = 0; c < head_dim; ++c) {
      double expected = 0.0;
      for (std::size_t i = 0; i < tokens; ++i) {
        expected += weights[i] * double(values[(h * tokens + i) * head_dim + c]);
      }
      expected /= total;
      const double delta = double(output[head * head_dim + c]) - expected;
      difference += delta * delta;
      norm += expected * expected;
    }
  }
  const double bytes =
      static_cast<double>(cache.stats().code_bytes) / static_cast<double>(kv_heads * tokens);
  state.counters["attention_error"] = std::sqrt(difference / norm);
  state.counters["bytes_per_token"] = bytes;
  state.counters["compression_vs_f16"] = static_cast<double>(4 * head_dim) / bytes;
  state.SetLabel(std::string(Quant::name()) + (calibrated ? "+perm" : ""));
}

// ---- DRAM floor ---------------------------------------------------------------------------

// A STREAM-like read: the sum of a 512 MiB float array (far larger than any cache), with
// Eigen's vectorized reduction. Its bytes_per_second is the DRAM read bandwidth one core
// reaches; bench/report divides each attend's bytes by it to get the time floor.
void BM_memory_read_bandwidth(benchmark::State& state) {
  const std::size_t count = (std::size_t{512} << 20) / sizeof(float);
  std::vector<float> data(count, 1.0F);
  const Eigen::Map<const Eigen::ArrayXf> array(data.data(), static_cast<Eigen::Index>(count));
  for (auto _ : state) {
    float sum = array.sum();
    benchmark::DoNotOptimize(sum);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * count * sizeof(float)));
  state.counters["bytes"] = static_cast<double>(count * sizeof(float));
}

// append: every context with the default options; the 8K context also without
// check_finite, to show what the input scan costs.
void append_shapes(benchmark::internal::Benchmark* bench) {
  for (std::int64_t tokens : {1024, 8192, 32768}) bench->Args({tokens, 1});
  bench->Args({8192, 0});
  bench->ArgNames({"context", "check_finite"});
}

void contexts_and_groups(benchmark::internal::Benchmark* bench) {
  for (std::int64_t tokens : {1024, 8192, 16384, 32768}) {
    for (std::int64_t group : {1, 4}) bench->Args({tokens, group});
  }
}

}  // namespace

BENCHMARK(BM_memory_read_bandwidth)->Unit(benchmark::kMillisecond);

BENCHMARK(BM_append_prefill<kvc::quant::Dense<float>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Dense<Eigen::half>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Dense<float>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_decode<kvc::quant::Dense<Eigen::half>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Int8<>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Int8<>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Q8_0>)->Apply(append_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Q8_0>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Q4_0>)->Apply(append_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Q4_0>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Rotated<kvc::quant::Q4_0>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Rotated<kvc::quant::Q4_0>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Rotated<kvc::quant::Int8<>>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Rotated<kvc::quant::Int8<>>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Bfp<16, 4>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Bfp<16, 4>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Bfp<32, 8>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Bfp<32, 8>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Kivi<4>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Kivi<4>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Kivi<2>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Kivi<2>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::LowRankKeys<>>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::LowRankKeys<>>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Fp8E4M3>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Fp8E4M3>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);
BENCHMARK(BM_append_prefill<kvc::quant::Fp8E5M2>)
    ->Apply(append_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_append_decode<kvc::quant::Fp8E5M2>)
    ->Apply(append_shapes)
    ->Iterations(decode_appends)
    ->Unit(benchmark::kNanosecond);

BENCHMARK(BM_attend_eigen_f32)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Dense<float>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Dense<Eigen::half>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Int8<>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Q8_0>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Int8<32>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Q4_0>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Rotated<kvc::quant::Q4_0>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Rotated<kvc::quant::Int8<>>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Bfp<16, 4>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Bfp<32, 8>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Kivi<4>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Kivi<2>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::LowRankKeys<>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Think<>>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Fp8E4M3>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_attend_kvc<kvc::quant::Fp8E5M2>)
    ->Apply(contexts_and_groups)
    ->ArgNames({"context", "group"})
    ->Unit(benchmark::kMicrosecond);

int main(int argc, char** argv) {
  return kvc::bench::run_benchmarks(argc, argv,
                                    fmt::format("layers 1, kv_heads {}, head_dim {}, "
                                                "prefill chunk {}",
                                                kv_heads, head_dim, prefill_chunk));
}

BENCHMARK(BM_attend_quality<kvc::quant::Dense<float>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Dense<Eigen::half>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Dense<Eigen::bfloat16>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Int8<>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Int8<32>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Q8_0>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Q4_0>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Rotated<kvc::quant::Q4_0>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Rotated<kvc::quant::Int8<>>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Bfp<16, 4>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Bfp<16, 4>, true>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Bfp<32, 8>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Bfp<32, 8>, true>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Kivi<4>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Kivi<2>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::LowRankKeys<>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Think<>>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Fp8E4M3>)->Iterations(1);
BENCHMARK(BM_attend_quality<kvc::quant::Fp8E5M2>)->Iterations(1);
