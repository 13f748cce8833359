// bench/scoring.cpp — what each eviction scorer adds to a decode step, beside the attend
// cost of the same step.
//
// Shape: context 4K tokens, head_dim 128, 8 kv heads, GQA 4 (32 query heads), one layer,
// one sequence, single thread, Dense<float> (bench/attend.cpp's conventions).
//
//   BM_decode_step<Scorer>   one decode step — append 1 token, attend 1 query (all query
//                            heads) — on a KvCache<Scorer> holding the context under a token
//                            budget of 4096 with a decode buffer of 64: auto_compress off, the
//                            host compresses when the heads reach budget + 65 tokens (what
//                            CacheOptions::eviction_slack = 64 does), i.e. every 65 steps.
//                            Interleaved with it, the same step on a KvCache<evict::Full>
//                            (truncated back to 4096 tokens outside the timed region at the
//                            same cadence, so both see the same context lengths). The host
//                            calls each scorer needs are timed as part of its step:
//                            ExpectedAttention::stage_queries before the append,
//                            External::supply per kv head; SnapKV, CakeIndicator and
//                            WindowKV observe their window queries right before each
//                            compress (kvpress DecodingPress style), timed as part of the
//                            compress. DuoAttention runs with its default roles (half the
//                            heads retrieval) under this budget (budget::Uniform), so every
//                            head is scored: its scoring cost, not its memory saving.
//
// Each iteration is one decode step; the run is a fixed number of compress cycles (8 cycles
// of 65 steps). The manual time of an iteration is the scorer's step + its compress cost
// amortized. Counters, per step, divided by context tokens × kv heads (32768):
//   ns_per_token_head           the scorer's step, compress amortized (= the manual time)
//   full_ns_per_token_head      the same step on KvCache<Full>: the attend cost
//   step_ns_per_token_head      the scorer's append + attend alone (no compress)
//   compress_ns_per_token_head  the compress (and observe) cost amortized over the steps
//   ratio_vs_full               ns_per_token_head / full_ns_per_token_head
//   overhead_ns_per_token_head  ns_per_token_head − full_ns_per_token_head: what the scorer
//                               adds (per-step tracking, attention weights, scoring,
//                               selection and compaction)
//   compressions                compress calls in the run
//
// A run with a tiny --benchmark_min_time (the ctest smoke test passes 0.001) uses a 512-token
// context, a buffer of 8 and 2 cycles instead, so that it stays within seconds.
//
//   kvc_bench_scoring --benchmark_out=bench/results/scoring.json --benchmark_out_format=json
//   bench/report scoring bench/results/scoring.json -o bench/results/scoring.md
#include <kvc/kvc.hpp>

#include "machine.hpp"
#include "random.hpp"

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

constexpr std::size_t kv_heads = 8;
constexpr std::size_t head_dim = 128;
constexpr std::size_t group = 4;
constexpr std::size_t q_heads = kv_heads * group;
constexpr std::size_t prefill_chunk = 512;
constexpr std::size_t decode_tokens = 256;  // distinct decode-step inputs, reused cyclically

// The run's shape; main picks the full or the quick one.
struct Shape {
  std::size_t context = 4096;  // tokens held after each compress (the budget)
  std::size_t slack = 64;      // decode buffer: compress when a head holds context + slack + 1
  std::size_t cycles = 8;      // compress cycles per benchmark
  std::size_t steps() const noexcept { return cycles * (slack + 1); }
};
Shape shape;

// Uniform on [-√3, √3) (mean 0, variance 1) from splitmix64, as bench/attend.cpp.
using kvc::bench::random_floats;

// [heads][tokens][head_dim] random data with strided windows, as bench/attend.cpp's Context.
struct Tensor {
  std::size_t heads = 0, tokens = 0;
  std::vector<float> data;

  Tensor(std::size_t h, std::size_t n, std::uint64_t seed)
      : heads(h), tokens(n), data(random_floats(h * n * head_dim, seed)) {}

  kvc::View<const float, 3> window(std::size_t first, std::size_t count) const {
    return {
        data.data() + first * head_dim,
        {heads, count, head_dim},
        {static_cast<std::ptrdiff_t>(tokens * head_dim), static_cast<std::ptrdiff_t>(head_dim), 1}};
  }
};

// The inputs of one benchmark: the prompt, the decode steps' K/V/q and a query window.
struct Inputs {
  Tensor prompt_keys, prompt_values, keys, values, queries;
  explicit Inputs(std::size_t context)
      : prompt_keys(kv_heads, context, 1),
        prompt_values(kv_heads, context, 2),
        keys(kv_heads, decode_tokens, 3),
        values(kv_heads, decode_tokens, 4),
        queries(q_heads, decode_tokens, 5) {}
};

const kvc::Geometry geometry{
    .layers = 1, .q_heads = q_heads, .kv_heads = kv_heads, .head_dim = head_dim};

template <class Cache>
void fill(Cache& cache, kvc::SequenceId sequence, const Inputs& inputs) {
  const std::size_t n = inputs.prompt_keys.tokens;
  for (std::size_t first = 0; first < n; first += prefill_chunk) {
    const std::size_t count = std::min(prefill_chunk, n - first);
    cache.append(sequence, 0, inputs.prompt_keys.window(first, count),
                 inputs.prompt_values.window(first, count));
  }
}

// The window a scorer observes before a compress: SnapKV's and CakeIndicator's (0: none; TOVA
// observes only for its exact prompt rule, not during decode).
template <class Scorer>
std::size_t observe_window(const Scorer& scorer) {
  if constexpr (kvc::ObservesQueries<Scorer> && requires { scorer.options().window; }) {
    return std::min(scorer.options().window, decode_tokens);
  } else {
    (void)scorer;
    return 0;
  }
}

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

template <class Scorer>
void BM_decode_step(benchmark::State& state) {
  const std::size_t n = shape.context;
  const Inputs inputs(n);
  kvc::KvCache<kvc::evict::Full> full(geometry);
  kvc::KvCache<Scorer> cache(geometry, {.budget = kvc::Budget::tokens(n), .auto_compress = false});
  const kvc::SequenceId full_sequence = full.open_sequence();
  const kvc::SequenceId sequence = cache.open_sequence();
  fill(full, full_sequence, inputs);
  fill(cache, sequence, inputs);
  const std::size_t window = observe_window(cache.scorer());
  if (window > 0) cache.observe(sequence, 0, inputs.queries.window(0, window));

  std::vector<float> output(q_heads * head_dim);
  const kvc::View<float, 3> out(output.data(), {q_heads, 1, head_dim});
  const std::vector<float> host_scores = random_floats(kv_heads, 6);
  std::size_t step = 0;
  std::size_t held = n;  // tokens per head in both caches
  std::size_t compressions = 0;
  double full_seconds = 0.0, step_seconds = 0.0, compress_seconds = 0.0;
  for (auto _ : state) {
    const std::size_t t = step % decode_tokens;
    const auto k = inputs.keys.window(t, 1);
    const auto v = inputs.values.window(t, 1);
    const auto q = inputs.queries.window(t, 1);

    const Clock::time_point start = Clock::now();
    full.append(full_sequence, 0, k, v);
    full.attend(full_sequence, 0, q, out);
    benchmark::ClobberMemory();
    const Clock::time_point full_done = Clock::now();

    if constexpr (std::is_same_v<Scorer, kvc::evict::ExpectedAttention>) {
      cache.scorer().stage_queries(geometry, 0, q);
    } else if constexpr (std::is_same_v<Scorer, kvc::evict::External>) {
      for (std::size_t h = 0; h < kv_heads; ++h) {
        cache.scorer().supply(0, h, std::span<const float>(host_scores.data() + h, 1));
      }
    }
    cache.append(sequence, 0, k, v);
    cache.attend(sequence, 0, q, out);
    benchmark::ClobberMemory();
    const Clock::time_point step_done = Clock::now();

    double compress_time = 0.0;
    ++step;
    if (++held > n + shape.slack) {
      // The last `window` appended positions' queries (their values do not change the cost).
      if (window > 0) cache.observe(sequence, 0, inputs.queries.window(0, window));
      cache.compress(sequence);
      compress_time = seconds_between(step_done, Clock::now());
      full.truncate(full_sequence, n);  // Full holds positions 0 … n + slack: keep the first n
      held = n;
      ++compressions;
    }
    full_seconds += seconds_between(start, full_done);
    step_seconds += seconds_between(full_done, step_done);
    compress_seconds += compress_time;
    state.SetIterationTime(seconds_between(full_done, step_done) + compress_time);
  }

  const double steps = static_cast<double>(state.iterations());
  const double per = 1e9 / (steps * static_cast<double>(n * kv_heads));  // s → ns/token/head
  const double total = step_seconds + compress_seconds;
  state.counters["context"] = static_cast<double>(n);
  state.counters["ns_per_token_head"] = total * per;
  state.counters["full_ns_per_token_head"] = full_seconds * per;
  state.counters["step_ns_per_token_head"] = step_seconds * per;
  state.counters["compress_ns_per_token_head"] = compress_seconds * per;
  state.counters["overhead_ns_per_token_head"] = (total - full_seconds) * per;
  state.counters["ratio_vs_full"] = full_seconds > 0.0 ? total / full_seconds : 0.0;
  state.counters["compressions"] = static_cast<double>(compressions);
  state.SetLabel(std::string(Scorer::name()));
}

template <class Scorer>
void add(std::string_view name) {
  benchmark::RegisterBenchmark(fmt::format("BM_decode_step<{}>", name).c_str(),
                               BM_decode_step<Scorer>)
      ->Iterations(static_cast<benchmark::IterationCount>(shape.steps()))
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

// The value of --benchmark_min_time if given ("0.001", "0.001s"; "10x" counts as long).
double min_time_argument(int argc, char** argv) {
  constexpr std::string_view flag = "--benchmark_min_time=";
  for (int i = 1; i < argc; ++i) {
    const std::string_view argument = argv[i];
    if (argument.rfind(flag, 0) == 0 && argument.find('x') == std::string_view::npos) {
      return std::strtod(std::string(argument.substr(flag.size())).c_str(), nullptr);
    }
  }
  return 1.0;
}

}  // namespace

int main(int argc, char** argv) {
  if (min_time_argument(argc, argv) < 0.05) shape = {.context = 512, .slack = 8, .cycles = 2};
  add<kvc::evict::StreamingLLM>("StreamingLLM");
  add<kvc::evict::H2O>("H2O");
  add<kvc::evict::SnapKV>("SnapKV");
  add<kvc::evict::TOVA>("TOVA");
  add<kvc::evict::Knorm>("Knorm");
  add<kvc::evict::KeyDiff>("KeyDiff");
  add<kvc::evict::ExpectedAttention>("ExpectedAttention");
  add<kvc::evict::Keyformer>("Keyformer");
  add<kvc::evict::LazyEviction>("LazyEviction");
  add<kvc::evict::CakeIndicator>("CakeIndicator");
  add<kvc::evict::WindowKV>("WindowKV");
  add<kvc::evict::DuoAttention>("DuoAttention");
  add<kvc::evict::D2O<kvc::evict::H2O>>("D2O");
  add<kvc::evict::External>("External");

  return kvc::bench::run_benchmarks(
      argc, argv,
      fmt::format("layers 1, kv_heads {}, head_dim {}, group {}, context {}, decode "
                  "buffer {}, {} steps",
                  kv_heads, head_dim, group, shape.context, shape.slack, shape.steps()));
}
