// bench/fidelity.cpp — how much each eviction policy changes attention, against the full
// cache on the same inputs, and what it costs in memory.
//
// Inputs: bench/synthetic.hpp (sinks, a drifting local window, heavy hitters, a planted
// needle asked by the prompt's last queries and by the final query, outlier key channels,
// sharper attention in higher layers), 4 layers, 8 query heads, 2 kv heads, head_dim 64,
// a 4096-token prompt, 16 decode steps and one final "question" step.
//
// For each scorer (Full, StreamingLLM, H2O, SnapKV, TOVA, Knorm, KeyDiff, Keyformer,
// LazyEviction, CakeIndicator, WindowKV, D2O<H2O>; ExpectedAttention and External need host
// calls this loop does not make) × planner (Uniform, PyramidKV, AdaKV, Cake — its layer
// shares re-split as each layer is observed, earlier layers squeezed at once — and PrefixKV,
// which plans every layer together when the last layer is compressed) × budget (1/2, 1/4,
// 1/8, 1/16 of the
// prompt, as Budget::tokens), plus DuoAttention with its own planner (budget::DuoAttention:
// retrieval heads keep every token, streaming heads min(64 sinks + 256 recent, budget)) and
// roles calibrated on the synthetic prompt itself (evict::calibrate_head_roles on the
// softmax of the last 64 prompt queries, half of the (layer, kv head) retrieval; the roles
// are written to the JSON's config), one KvCache<Scorer, Dense<float>, Exhaustive, None,
// Planner>, with
// auto_compress off and the host loop a prefill-then-decode engine would run, per layer:
//   prefill  append(prompt); attend(all prompt queries, causal) when the scorer consumes
//            attention (H2O, TOVA: the attention is the score; other scorers would get
//            nothing from it, so the prefill attention is left to the host's own kernel);
//            observe(the last 64 prompt queries); compress(seq, layer)
//   decode   16 steps of append(1 token); attend(1 query); compress(seq, layer)
//   question append(1 token); attend(the question query); compress
// and Full (unlimited budget) is the reference. Metrics:
//   decode_error    ‖out − out_full‖₂ / ‖out_full‖₂ of one step's attention output over all
//                   query heads of a layer; mean over the decode steps and layers
//   question_error  the same for the final question query, mean over layers
//   mass_recall     Σ over kept tokens of the full cache's attention weight of the question
//                   query (float64 reference over every token); mean over layers and query
//                   heads: 1 = nothing the question looks at was evicted
//   needle_kept     fraction of (layer, kv head) still holding the needle at the question
//   bytes_held      stats().bytes_held() after the question step (pages + metadata);
//                   ratio_vs_full = Full's bytes_held / this; code_bytes = the K/V codes
//                   alone (bytes_held adds the unused tail of each head's last page, which
//                   ragged budgets such as PyramidKV's pay per layer, and metadata)
//   tokens_per_layer  tokens held per kv head, per layer (the planner's shape)
//
// Usage:
//   kvc_bench_fidelity [OUT.json] [--quick] [--threads N]
// OUT.json defaults to bench/results/fidelity.json; a markdown table goes to stdout
// (bench/report fidelity OUT.json -o OUT.md writes the documented one). --quick: a 512-token
// prompt, 4 decode steps, budget 1/4 only. Any --benchmark_* argument (the ctest smoke test
// passes --benchmark_min_time=0.001) is accepted and implies --quick, and then the JSON is
// written only when a path is given.
#include "machine.hpp"
#include "synthetic.hpp"

#include <kvc/budget/duo_attention.hpp>
#include <kvc/evict/duo_attention.hpp>
#include <kvc/evict/window_kv.hpp>
#include <kvc/kvc.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

using kvc::bench::SyntheticLayer;
using kvc::bench::SyntheticOptions;

struct Settings {
  std::size_t prompt_tokens = 4096;
  std::size_t decode_steps = 16;
  std::size_t observe_window = 64;
  std::vector<std::size_t> budget_divisors{2, 4, 8, 16};
  std::size_t threads = 0;  // 0: hardware concurrency
  bool quick = false;
  std::string json_path = "bench/results/fidelity.json";
  bool write_json = true;
};

// Everything one configuration produced, before it is compared with the reference.
struct RunOutput {
  std::vector<std::vector<std::vector<float>>> outputs;       // [step][layer] → q_heads × d
  std::vector<std::vector<std::vector<kvc::Position>>> kept;  // [layer][kv_head] at question
  kvc::CacheStats stats;
  double seconds = 0.0;
};

struct Data {
  SyntheticOptions options;
  std::vector<SyntheticLayer> layers;
  // Float64 softmax of each question query over every token: [layer][q_head][token].
  std::vector<std::vector<std::vector<double>>> question_weights;
};

kvc::Geometry geometry_of(const SyntheticOptions& o) {
  return {.layers = o.layers, .q_heads = o.q_heads, .kv_heads = o.kv_heads, .head_dim = o.head_dim};
}

// Tokens [first, first + count) of a [heads][tokens][d] array, as a strided view (no copy).
kvc::View<const float, 3> window(const std::vector<float>& data, std::size_t heads,
                                 std::size_t tokens, std::size_t d, std::size_t first,
                                 std::size_t count) {
  return {data.data() + first * d,
          {heads, count, d},
          {static_cast<std::ptrdiff_t>(tokens * d), static_cast<std::ptrdiff_t>(d), 1}};
}

// Float64 softmax weights of query t of head qh over tokens 0..t.
std::vector<double> reference_weights(const Data& data, std::size_t layer, std::size_t qh,
                                      std::size_t t) {
  const SyntheticOptions& o = data.options;
  const std::size_t d = o.head_dim;
  const std::size_t n = o.tokens;
  const std::size_t kv = qh / (o.q_heads / o.kv_heads);
  const float* query = data.layers[layer].queries.data() + (qh * n + t) * d;
  const float* keys = data.layers[layer].keys.data() + kv * n * d;
  std::vector<double> weights(t + 1);
  double largest = -INFINITY;
  for (std::size_t i = 0; i <= t; ++i) {
    double s = 0.0;
    for (std::size_t c = 0; c < d; ++c) s += double(query[c]) * double(keys[i * d + c]);
    weights[i] = s / std::sqrt(static_cast<double>(d));
    largest = std::max(largest, weights[i]);
  }
  double total = 0.0;
  for (double& w : weights) total += (w = std::exp(w - largest));
  for (double& w : weights) w /= total;
  return weights;
}

// Where the attention of query t goes: sinks, the last `window` tokens, heavy hitters,
// the needle, the rest (averaged over layers and query heads by the caller).
nlohmann::json profile(const Data& data, const std::vector<std::size_t>& steps,
                       std::size_t window_tokens) {
  const SyntheticOptions& o = data.options;
  double sinks = 0, recent = 0, heavy = 0, needle = 0, rest = 0, count = 0;
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    const SyntheticLayer& synthetic = data.layers[layer];
    for (std::size_t qh = 0; qh < o.q_heads; ++qh) {
      const auto& heavy_positions = synthetic.heavy_positions[qh / (o.q_heads / o.kv_heads)];
      for (std::size_t t : steps) {
        const auto weights = reference_weights(data, layer, qh, t);
        for (std::size_t i = 0; i <= t; ++i) {
          if (i < o.sinks) {
            sinks += weights[i];
          } else if (i == synthetic.needle_position) {
            needle += weights[i];
          } else if (std::find(heavy_positions.begin(), heavy_positions.end(), i) !=
                     heavy_positions.end()) {
            heavy += weights[i];
          } else if (i + window_tokens > t) {
            recent += weights[i];
          } else {
            rest += weights[i];
          }
        }
        count += 1;
      }
    }
  }
  return {{"sinks", sinks / count},
          {"recent_64", recent / count},
          {"heavy_hitters", heavy / count},
          {"needle", needle / count},
          {"rest", rest / count}};
}

template <class Scorer, class Planner>
RunOutput run_cache(const Data& data, const Settings& settings, kvc::Budget budget, Planner planner,
                    Scorer scorer = Scorer{}) {
  using Cache = kvc::KvCache<Scorer, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, Planner>;
  const auto start = std::chrono::steady_clock::now();
  const SyntheticOptions& o = data.options;
  const std::size_t n = o.tokens;
  const std::size_t d = o.head_dim;
  const std::size_t prompt = settings.prompt_tokens;
  Cache cache(geometry_of(o), {.budget = budget, .auto_compress = false}, std::move(scorer), {}, {},
              {}, std::move(planner));
  const kvc::SequenceId sequence = cache.open_sequence();
  RunOutput result;

  std::vector<float> prefill_out;
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    const SyntheticLayer& s = data.layers[layer];
    cache.append(sequence, layer, window(s.keys, o.kv_heads, n, d, 0, prompt),
                 window(s.values, o.kv_heads, n, d, 0, prompt));
    if constexpr (kvc::ConsumesAttention<Scorer>) {
      prefill_out.resize(o.q_heads * prompt * d);
      cache.attend(sequence, layer, window(s.queries, o.q_heads, n, d, 0, prompt),
                   kvc::View<float, 3>(prefill_out.data(), {o.q_heads, prompt, d}));
    }
    const std::size_t w = std::min(settings.observe_window, prompt);
    cache.observe(sequence, layer, window(s.queries, o.q_heads, n, d, prompt - w, w));
    cache.compress(sequence, layer);
  }

  // Decode steps, then the question (the last generated token).
  const std::size_t steps = n - prompt;
  result.outputs.assign(steps, std::vector<std::vector<float>>(o.layers));
  result.kept.resize(o.layers);
  for (std::size_t step = 0; step < steps; ++step) {
    const std::size_t t = prompt + step;
    for (std::size_t layer = 0; layer < o.layers; ++layer) {
      const SyntheticLayer& s = data.layers[layer];
      cache.append(sequence, layer, window(s.keys, o.kv_heads, n, d, t, 1),
                   window(s.values, o.kv_heads, n, d, t, 1));
      if (step + 1 == steps) {
        for (std::size_t h = 0; h < o.kv_heads; ++h) {
          result.kept[layer].push_back(cache.positions(sequence, layer, h));
        }
      }
      std::vector<float>& out = result.outputs[step][layer];
      out.resize(o.q_heads * d);
      cache.attend(sequence, layer, window(s.queries, o.q_heads, n, d, t, 1),
                   kvc::View<float, 3>(out.data(), {o.q_heads, 1, d}));
      cache.compress(sequence, layer);
    }
  }
  result.stats = cache.stats();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

double relative_error(const std::vector<float>& out, const std::vector<float>& reference) {
  double difference = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double delta = double(out[i]) - double(reference[i]);
    difference += delta * delta;
    norm += double(reference[i]) * double(reference[i]);
  }
  return norm > 0.0 ? std::sqrt(difference / norm) : std::sqrt(difference);
}

struct Job {
  std::string scorer, planner;
  std::size_t divisor = 0;  // 0: unlimited (Full)
  std::function<RunOutput()> run;
};

nlohmann::json measure(const Data& data, const Job& job, const RunOutput& run,
                       const RunOutput& full) {
  const SyntheticOptions& o = data.options;
  const std::size_t steps = run.outputs.size();
  const std::size_t group = o.q_heads / o.kv_heads;
  std::vector<double> decode_per_layer(o.layers, 0.0), question_per_layer(o.layers, 0.0);
  double decode_max = 0.0;
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    for (std::size_t step = 0; step + 1 < steps; ++step) {
      const double e = relative_error(run.outputs[step][layer], full.outputs[step][layer]);
      decode_per_layer[layer] += e / static_cast<double>(std::max<std::size_t>(steps - 1, 1));
      decode_max = std::max(decode_max, e);
    }
    question_per_layer[layer] =
        relative_error(run.outputs[steps - 1][layer], full.outputs[steps - 1][layer]);
  }
  double mass = 0.0, needle = 0.0;
  std::vector<double> tokens_per_layer(o.layers, 0.0);
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    const std::size_t needle_position = data.layers[layer].needle_position;
    for (std::size_t h = 0; h < o.kv_heads; ++h) {
      const auto& kept = run.kept[layer][h];
      needle +=
          std::binary_search(kept.begin(), kept.end(), static_cast<kvc::Position>(needle_position))
              ? 1.0
              : 0.0;
      tokens_per_layer[layer] +=
          static_cast<double>(run.stats.tokens(layer, h)) / static_cast<double>(o.kv_heads);
      for (std::size_t g = 0; g < group; ++g) {
        const auto& weights = data.question_weights[layer][h * group + g];
        for (kvc::Position p : kept) mass += weights[static_cast<std::size_t>(p)];
      }
    }
  }
  const auto mean = [](const std::vector<double>& v) {
    double sum = 0.0;
    for (double x : v) sum += x;
    return sum / static_cast<double>(v.size());
  };
  const double bytes = static_cast<double>(run.stats.bytes_held());
  return {
      {"scorer", job.scorer},
      {"planner", job.planner},
      {"budget_fraction", job.divisor == 0 ? 1.0 : 1.0 / static_cast<double>(job.divisor)},
      {"budget_tokens", job.divisor == 0 ? o.prompt_tokens : o.prompt_tokens / job.divisor},
      {"decode_error", mean(decode_per_layer)},
      {"decode_error_max", decode_max},
      {"question_error", mean(question_per_layer)},
      {"mass_recall", mass / static_cast<double>(o.layers * o.q_heads)},
      {"needle_kept", needle / static_cast<double>(o.layers * o.kv_heads)},
      {"bytes_held", run.stats.bytes_held()},
      {"code_bytes", run.stats.code_bytes},
      {"ratio_vs_full", static_cast<double>(full.stats.bytes_held()) / bytes},
      {"compression_ratio_vs_f16", run.stats.compression_ratio()},
      {"tokens_per_layer", tokens_per_layer},
      {"decode_error_per_layer", decode_per_layer},
      {"question_error_per_layer", question_per_layer},
      {"seconds", run.seconds},
  };
}

template <class Scorer>
void add_scorer(std::vector<Job>& jobs, const Data& data, const Settings& settings) {
  for (std::size_t divisor : settings.budget_divisors) {
    const kvc::Budget budget = kvc::Budget::tokens(settings.prompt_tokens / divisor);
    jobs.push_back({std::string(Scorer::name()), std::string(kvc::budget::Uniform::name()), divisor,
                    [&data, &settings, budget] {
                      return run_cache<Scorer>(data, settings, budget, kvc::budget::Uniform{});
                    }});
    jobs.push_back({std::string(Scorer::name()), std::string(kvc::budget::PyramidKV::name()),
                    divisor, [&data, &settings, budget] {
                      return run_cache<Scorer>(
                          data, settings, budget,
                          kvc::budget::PyramidKV({.window = settings.observe_window}));
                    }});
    jobs.push_back({std::string(Scorer::name()), std::string(kvc::budget::AdaKV::name()), divisor,
                    [&data, &settings, budget] {
                      return run_cache<Scorer>(data, settings, budget, kvc::budget::AdaKV{});
                    }});
    jobs.push_back({std::string(Scorer::name()), std::string(kvc::budget::Cake::name()), divisor,
                    [&data, &settings, budget] {
                      return run_cache<Scorer>(
                          data, settings, budget,
                          kvc::budget::Cake({.window = settings.observe_window}));
                    }});
    jobs.push_back({std::string(Scorer::name()), std::string(kvc::budget::PrefixKV::name()),
                    divisor, [&data, &settings, budget] {
                      return run_cache<Scorer>(data, settings, budget, kvc::budget::PrefixKV{});
                    }});
  }
}

// DuoAttention's roles from the synthetic prompt: per (layer, kv head) the float64 softmax
// of the last `observe_window` prompt queries of each query head of the group, as the
// ObserveEvent layout calibrate_head_roles reads; half of the heads become retrieval.
kvc::evict::HeadRoles calibrated_roles(const Data& data, const Settings& settings) {
  const SyntheticOptions& o = data.options;
  const std::size_t prompt = settings.prompt_tokens;
  const std::size_t w = std::min(settings.observe_window, prompt);
  const std::size_t group = o.q_heads / o.kv_heads;
  std::vector<std::vector<float>> weights;
  std::vector<kvc::ObserveEvent> events;
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    for (std::size_t h = 0; h < o.kv_heads; ++h) {
      std::vector<float>& rows = weights.emplace_back(group * w * prompt, 0.0F);
      for (std::size_t g = 0; g < group; ++g) {
        for (std::size_t j = 0; j < w; ++j) {
          const auto row = reference_weights(data, layer, h * group + g, prompt - w + j);
          const auto offset = static_cast<std::ptrdiff_t>((g * w + j) * prompt);
          std::copy(row.begin(), row.end(), rows.begin() + offset);
        }
      }
      events.push_back({layer, h, {}, group * w, w, prompt});
    }
  }
  for (std::size_t i = 0; i < events.size(); ++i) events[i].weights = weights[i];
  return kvc::evict::calibrate_head_roles(events, o.layers, o.kv_heads,
                                          {.sink = 64, .recent = 256, .retrieval_fraction = 0.5});
}

void add_duo_attention(std::vector<Job>& jobs, const Data& data, const Settings& settings,
                       const kvc::evict::HeadRoles& roles) {
  for (std::size_t divisor : settings.budget_divisors) {
    const kvc::Budget budget = kvc::Budget::tokens(settings.prompt_tokens / divisor);
    jobs.push_back({std::string(kvc::evict::DuoAttention::name()),
                    std::string(kvc::budget::DuoAttention::name()), divisor,
                    [&data, &settings, &roles, budget] {
                      return run_cache<kvc::evict::DuoAttention>(
                          data, settings, budget,
                          kvc::budget::DuoAttention(roles, {.sink = 64, .recent = 256}),
                          kvc::evict::DuoAttention(roles, {.sink = 64}));
                    }});
  }
}

std::vector<RunOutput> run_all(const std::vector<Job>& jobs, std::size_t threads) {
  std::vector<RunOutput> results(jobs.size());
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  const auto worker = [&] {
    for (std::size_t i = next++; i < jobs.size(); i = next++) {
      try {
        results[i] = jobs[i].run();
      } catch (...) {
        const std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
  return results;
}

std::string now_iso8601() {
  const std::time_t now = std::time(nullptr);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return text;
}

Settings parse(int argc, char** argv) {
  Settings settings;
  bool path_given = false;
  bool benchmark_flag = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view argument = argv[i];
    if (argument.rfind("--benchmark_", 0) == 0) {
      benchmark_flag = true;
    } else if (argument == "--quick") {
      settings.quick = true;
    } else if (argument == "--threads" && i + 1 < argc) {
      settings.threads = std::stoul(argv[++i]);
    } else if (argument.rfind("--", 0) == 0) {
      throw std::invalid_argument(fmt::format("fidelity: unknown option {}", argument));
    } else {
      settings.json_path = std::string(argument);
      path_given = true;
    }
  }
  if (benchmark_flag) {
    settings.quick = true;
    settings.write_json = path_given;
  }
  if (settings.quick) {
    settings.prompt_tokens = 512;
    settings.decode_steps = 4;
    settings.budget_divisors = {4};
  }
  if (settings.threads == 0) {
    settings.threads = std::max(1U, std::thread::hardware_concurrency());
  }
  return settings;
}

std::string markdown(const nlohmann::json& runs) {
  std::string text =
      "| scorer | planner | budget | decode err | question err | mass recall | needle kept | "
      "bytes held | × vs full |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& r : runs) {
    text += fmt::format("| {} | {} | {} | {:.4f} | {:.4f} | {:.3f} | {:.2f} | {} | {:.2f}× |\n",
                        r["scorer"].get<std::string>(), r["planner"].get<std::string>(),
                        r["budget_tokens"].get<std::size_t>(), r["decode_error"].get<double>(),
                        r["question_error"].get<double>(), r["mass_recall"].get<double>(),
                        r["needle_kept"].get<double>(), r["bytes_held"].get<std::size_t>(),
                        r["ratio_vs_full"].get<double>());
  }
  return text;
}

int run(int argc, char** argv) {
  const Settings settings = parse(argc, argv);
  const auto start = std::chrono::steady_clock::now();

  Data data;
  data.options.prompt_tokens = settings.prompt_tokens;
  data.options.tokens = settings.prompt_tokens + settings.decode_steps + 1;
  for (std::size_t layer = 0; layer < data.options.layers; ++layer) {
    data.layers.push_back(kvc::bench::synthetic_layer(data.options, layer));
  }
  const SyntheticOptions& o = data.options;
  data.question_weights.resize(o.layers);
  for (std::size_t layer = 0; layer < o.layers; ++layer) {
    for (std::size_t qh = 0; qh < o.q_heads; ++qh) {
      data.question_weights[layer].push_back(reference_weights(data, layer, qh, o.tokens - 1));
    }
  }

  std::vector<Job> jobs;
  jobs.push_back({std::string(kvc::evict::Full::name()), std::string(kvc::budget::Uniform::name()),
                  0, [&data, &settings] {
                    return run_cache<kvc::evict::Full>(data, settings, kvc::Budget::unlimited(),
                                                       kvc::budget::Uniform{});
                  }});
  add_scorer<kvc::evict::StreamingLLM>(jobs, data, settings);
  add_scorer<kvc::evict::H2O>(jobs, data, settings);
  add_scorer<kvc::evict::SnapKV>(jobs, data, settings);
  add_scorer<kvc::evict::TOVA>(jobs, data, settings);
  add_scorer<kvc::evict::Knorm>(jobs, data, settings);
  add_scorer<kvc::evict::KeyDiff>(jobs, data, settings);
  add_scorer<kvc::evict::Keyformer>(jobs, data, settings);
  add_scorer<kvc::evict::LazyEviction>(jobs, data, settings);
  add_scorer<kvc::evict::CakeIndicator>(jobs, data, settings);
  add_scorer<kvc::evict::WindowKV>(jobs, data, settings);
  add_scorer<kvc::evict::D2O<kvc::evict::H2O>>(jobs, data, settings);
  const kvc::evict::HeadRoles duo_roles = calibrated_roles(data, settings);
  add_duo_attention(jobs, data, settings, duo_roles);
  const std::vector<RunOutput> outputs = run_all(jobs, settings.threads);

  nlohmann::json runs = nlohmann::json::array();
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    runs.push_back(measure(data, jobs[i], outputs[i], outputs[0]));
  }
  std::vector<std::size_t> decode_steps;
  for (std::size_t t = settings.prompt_tokens; t + 1 < o.tokens; ++t) decode_steps.push_back(t);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  nlohmann::json report{
      {"benchmark", "fidelity"},
      {"context",
       {{"cpu", kvc::bench::cpu_model()},
        {"simd_arch", kvc::simd::arch_name()},
        {"kvc_version",
         fmt::format("{}.{}.{}", kvc::version_major, kvc::version_minor, kvc::version_patch)},
#if defined(__clang__)
        {"compiler", fmt::format("clang {}", __VERSION__)},
#else
        {"compiler", fmt::format("gcc {}", __VERSION__)},
#endif
        {"date", now_iso8601()},
        {"threads", settings.threads},
        {"seconds", seconds},
        {"quick", settings.quick}}},
      {"config",
       {{"layers", o.layers},
        {"q_heads", o.q_heads},
        {"kv_heads", o.kv_heads},
        {"head_dim", o.head_dim},
        {"prompt_tokens", settings.prompt_tokens},
        {"decode_steps", settings.decode_steps},
        {"observe_window", settings.observe_window},
        {"pyramid_window", settings.observe_window},
        {"page_tokens", kvc::CacheOptions{}.page_tokens},
        {"quantizer", std::string(kvc::quant::Dense<float>::name())},
        {"budget_divisors", settings.budget_divisors},
        {"duo_attention_roles", duo_roles.to_string()}}},
      {"synthetic",
       {{"seed", o.seed},
        {"sinks", o.sinks},
        {"sink_logit", o.sink_logit},
        {"sink_value_scale", o.sink_value_scale},
        {"local_logit", o.local_logit},
        {"local_length", o.local_length},
        {"heavy_hitters", o.heavy_hitters},
        {"heavy_logit", o.heavy_logit},
        {"heavy_query_share", o.heavy_query_share},
        {"needle_position", data.layers[0].needle_position},
        {"needle_logit", o.needle_logit},
        {"question_tokens", o.question_tokens},
        {"outlier_channels", o.outlier_channels},
        {"outlier_scale", {o.outlier_scale_min, o.outlier_scale_max}},
        {"outlier_jitter", o.outlier_jitter},
        {"sharpness", {o.sharpness_first, o.sharpness_last}}}},
      {"attention_profile",
       {{"decode", profile(data, decode_steps, settings.observe_window)},
        {"question", profile(data, {o.tokens - 1}, settings.observe_window)}}},
      {"runs", runs},
  };

  std::fputs(markdown(runs).c_str(), stdout);
  std::printf("\n%zu configurations in %.1f s on %zu thread(s)\n", jobs.size(), seconds,
              settings.threads);
  if (settings.write_json) {
    const std::filesystem::path path(settings.json_path);
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << report.dump(2) << '\n';
    std::printf("wrote %s\n", settings.json_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
}
