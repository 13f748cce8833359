// synthetic-demo — kvc::KvCache embedded in a decode loop the way an inference engine embeds it.
//
// A tiny attention-only transformer with random weights (4 layers, 8 query heads sharing
// 2 kv heads, head_dim 64, hidden 256, RoPE) prefills a 1024-token random prompt in chunks
// of 256, then decodes 256 tokens. The same token stream runs through several cache
// compositions; each is compared with the full fp32 cache:
//
//   kept/head   tokens each (layer, kv head) holds at the end (of 1280 seen)
//   held MiB    CacheStats::bytes_held(): pages + metadata, exact
//   vs fp16     what a dense fp16 cache of all 1280 tokens would hold / bytes held
//   attn err    mean relative L2 error of the attention outputs, every layer and decode step
//   hidden err  mean relative L2 error of the final hidden state over the decode steps
//   ms/step     time spent in kvc (append + attend, all layers) per decode step
//
// The decode tokens are teacher-forced (the same for every recipe), so the errors measure
// the cache and nothing else. The weights are random: the numbers show the mechanics and
// the memory accounting, not the accuracy of a policy on a real model.
//
// Per layer, after RoPE, the host calls exactly:
//   cache.append(seq, layer, k, v);   // k, v: [kv_heads][n][head_dim] views
//   cache.attend(seq, layer, q, o);   // q, o: [q_heads][n][head_dim] views, causal

#include <kvc/kvc.hpp>

#include <fmt/core.h>
#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr kvc::Geometry geometry{.layers = 4, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
constexpr std::size_t hidden = 256;
constexpr std::size_t vocab = 512;
constexpr std::size_t prompt_tokens = 1024;
constexpr std::size_t prefill_chunk = 256;
constexpr std::size_t decode_steps = 256;
constexpr std::uint32_t seed = 20240611;

// Random weights, no biases, no MLP: each layer is x += Wo · attention(RoPE(RMSNorm(x))).
// Query and key entries come out with unit variance, so attention logits q·k/√d have a
// standard deviation of about 1.
struct Model {
  struct Layer {
    Matrix wq, wk, wv;  // hidden × (heads · head_dim)
    Matrix wo;          // (q_heads · head_dim) × hidden
  };
  Matrix embedding;  // vocab × hidden
  std::vector<Layer> layers;

  explicit Model(std::mt19937& rng) {
    const auto q_width = static_cast<Eigen::Index>(geometry.q_heads * geometry.head_dim);
    const auto kv_width = static_cast<Eigen::Index>(geometry.kv_heads * geometry.head_dim);
    const auto h = static_cast<Eigen::Index>(hidden);
    const float unit = 1.0F / std::sqrt(static_cast<float>(hidden));
    embedding = random(rng, static_cast<Eigen::Index>(vocab), h, 1.0F);
    for (std::size_t l = 0; l < geometry.layers; ++l) {
      layers.push_back({random(rng, h, q_width, unit), random(rng, h, kv_width, unit),
                        random(rng, h, kv_width, unit),
                        random(rng, q_width, h, 0.5F / std::sqrt(static_cast<float>(q_width)))});
    }
  }

  static Matrix random(std::mt19937& rng, Eigen::Index rows, Eigen::Index cols, float scale) {
    std::normal_distribution<float> normal(0.0F, scale);
    Matrix m(rows, cols);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
    return m;
  }
};

Matrix rms_norm(const Matrix& x) {
  Matrix y = x;
  for (Eigen::Index r = 0; r < y.rows(); ++r) {
    const float rms = std::sqrt(y.row(r).squaredNorm() / static_cast<float>(y.cols()) + 1e-6F);
    y.row(r) /= rms;
  }
  return y;
}

// Rotary embedding (rotate-half convention, base 10000) in place on [n][heads · head_dim].
void apply_rope(Matrix& x, std::size_t heads, std::size_t first_position) {
  const std::size_t d = geometry.head_dim;
  const std::size_t half = d / 2;
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const auto position = static_cast<double>(first_position + static_cast<std::size_t>(t));
    for (std::size_t i = 0; i < half; ++i) {
      const double angle =
          position * std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      const auto c = static_cast<float>(std::cos(angle));
      const auto s = static_cast<float>(std::sin(angle));
      for (std::size_t h = 0; h < heads; ++h) {
        float* row = x.row(t).data() + h * d;
        const float a = row[i];
        const float b = row[i + half];
        row[i] = a * c - b * s;
        row[i + half] = b * c + a * s;
      }
    }
  }
}

// The projections produce [n][heads][head_dim]; kvc wants [heads][n][head_dim]. A strided
// view reorders the indices without copying.
template <class T>
kvc::View<T, 3> heads_view(T* data, std::size_t heads, std::size_t tokens) {
  const std::size_t d = geometry.head_dim;
  return kvc::View<T, 3>(
      data, {heads, tokens, d},
      {static_cast<std::ptrdiff_t>(d), static_cast<std::ptrdiff_t>(heads * d), 1});
}

// What one run records: per decode step the final hidden state, and per (step, layer) the
// attention outputs.
struct Trace {
  std::vector<Matrix> hidden_states;
  std::vector<Matrix> attention;
  double kvc_seconds = 0;
};

// One forward pass of `tokens` (positions first_position, ...) through the model and cache.
template <class Cache>
Matrix forward(const Model& model, Cache& cache, kvc::SequenceId seq, std::span<const int> tokens,
               std::size_t first_position, Trace* trace) {
  const auto n = static_cast<Eigen::Index>(tokens.size());
  Matrix x(n, static_cast<Eigen::Index>(hidden));
  for (Eigen::Index t = 0; t < n; ++t) x.row(t) = model.embedding.row(tokens[t]);

  for (std::size_t l = 0; l < geometry.layers; ++l) {
    const Model::Layer& layer = model.layers[l];
    const Matrix h = rms_norm(x);
    Matrix q = h * layer.wq;
    Matrix k = h * layer.wk;
    const Matrix v = h * layer.wv;
    apply_rope(q, geometry.q_heads, first_position);
    apply_rope(k, geometry.kv_heads, first_position);
    Matrix o(n, q.cols());

    const auto start = std::chrono::steady_clock::now();
    const std::size_t count = tokens.size();
    cache.append(seq, l, heads_view<const float>(k.data(), geometry.kv_heads, count),
                 heads_view<const float>(v.data(), geometry.kv_heads, count));
    cache.attend(seq, l, heads_view<const float>(q.data(), geometry.q_heads, count),
                 heads_view<float>(o.data(), geometry.q_heads, count));
    const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;

    if (trace != nullptr) {
      trace->kvc_seconds += spent.count();
      trace->attention.push_back(o);
    }
    x += o * layer.wo;
  }
  return x;
}

struct Row {
  std::string recipe;
  double kept_per_head = 0;
  std::size_t bytes_held = 0;
  double ratio = 0;
  double attention_error = 0;
  double hidden_error = 0;
  double ms_per_step = 0;
  kvc::CacheStats stats;
};

double relative_error(const Matrix& a, const Matrix& reference) {
  return static_cast<double>((a - reference).norm() / reference.norm());
}

// Runs the whole prompt + decode through `cache`; compares with `reference` when given.
template <class Cache>
Row run(const std::string& recipe, Cache& cache, const Model& model, const std::vector<int>& stream,
        const Trace* reference, Trace& trace) {
  const kvc::SequenceId seq = cache.open_sequence();
  const std::span<const int> all(stream);
  for (std::size_t first = 0; first < prompt_tokens; first += prefill_chunk) {
    forward(model, cache, seq, all.subspan(first, prefill_chunk), first, nullptr);
  }
  for (std::size_t step = 0; step < decode_steps; ++step) {
    const std::size_t position = prompt_tokens + step;
    trace.hidden_states.push_back(
        forward(model, cache, seq, all.subspan(position, 1), position, &trace));
  }

  const kvc::CacheStats stats = cache.stats();
  Row row{recipe,
          static_cast<double>(stats.tokens_stored) /
              static_cast<double>(geometry.layers * geometry.kv_heads),
          stats.bytes_held(),
          stats.compression_ratio(),
          0.0,
          0.0,
          1e3 * trace.kvc_seconds / static_cast<double>(decode_steps),
          stats};
  if (reference != nullptr) {
    for (std::size_t i = 0; i < trace.attention.size(); ++i) {
      row.attention_error += relative_error(trace.attention[i], reference->attention[i]);
    }
    row.attention_error /= static_cast<double>(trace.attention.size());
    for (std::size_t i = 0; i < trace.hidden_states.size(); ++i) {
      row.hidden_error += relative_error(trace.hidden_states[i], reference->hidden_states[i]);
    }
    row.hidden_error /= static_cast<double>(trace.hidden_states.size());
  }
  cache.close(seq);
  return row;
}

void print_row(const Row& row) {
  fmt::print("  {:<28} {:>9.0f} {:>11.2f} {:>8.2f}x {:>9.2e} {:>10.2e} {:>8.3f}\n", row.recipe,
             row.kept_per_head, static_cast<double>(row.bytes_held) / (1024.0 * 1024.0), row.ratio,
             row.attention_error, row.hidden_error, row.ms_per_step);
}

}  // namespace

int main() {
  using namespace kvc;
  std::mt19937 rng(seed);
  const Model model(rng);
  std::vector<int> stream(prompt_tokens + decode_steps);
  std::uniform_int_distribution<int> token(0, static_cast<int>(vocab) - 1);
  for (int& t : stream) t = token(rng);

  fmt::print("kvc {}.{}.{} demo: one KvCache per recipe, same {}-token prompt + {} decode steps\n",
             version_major, version_minor, version_patch, prompt_tokens, decode_steps);
  fmt::print(
      "model: {} layers, {} query heads / {} kv heads, head_dim {}, hidden {}, RoPE; "
      "RANDOM weights (seed {})\n",
      geometry.layers, geometry.q_heads, geometry.kv_heads, geometry.head_dim, hidden, seed);
  fmt::print("prefill in chunks of {} (compressing between chunks), teacher-forced decode\n\n",
             prefill_chunk);
  fmt::print("  {:<28} {:>9} {:>11} {:>9} {:>9} {:>10} {:>8}\n", "recipe", "kept/head", "held MiB",
             "vs fp16", "attn err", "hidden err", "ms/step");
  fmt::print("  {:-<28} {:->9} {:->11} {:->9} {:->9} {:->10} {:->8}\n", "", "", "", "", "", "", "");

  const auto budget = [](std::size_t tokens) {
    return CacheOptions{.budget = Budget::tokens(tokens)};
  };

  Trace full_trace;
  {
    KvCache<> cache(geometry);
    print_row(run("full f32 (KvCache<>)", cache, model, stream, nullptr, full_trace));
  }
  Row last;
  const auto compare = [&](const std::string& recipe, auto& cache) {
    Trace trace;
    last = run(recipe, cache, model, stream, &full_trace, trace);
    print_row(last);
  };
  {
    KvCache<evict::Full, quant::Dense<Eigen::half>> cache(geometry);
    compare("full f16", cache);
  }
  {
    KvCache<evict::Full, quant::Dense<Eigen::bfloat16>> cache(geometry);
    compare("full bf16", cache);
  }
  {
    KvCache<evict::StreamingLLM> cache(geometry, budget(256), evict::StreamingLLM({.sink = 4}));
    compare("StreamingLLM sink 4, B=256", cache);
  }
  {
    KvCache<evict::H2O> cache(geometry, budget(256));
    compare("H2O B=256", cache);
  }
  {
    KvCache<evict::H2O> cache(geometry, {.budget = Budget::ratio(0.25)});
    compare("H2O ratio 0.25", cache);
  }
  {
    KvCache<evict::H2O, quant::Dense<Eigen::half>> cache(geometry, budget(256));
    compare("H2O B=256 + f16", cache);
  }
  // The accounting behind the last row, as kvc's fmt::formatter<CacheStats> prints it.
  fmt::print("\nfmt::print(\"{{}}\", cache.stats()) for the last row:\n  {}\n", last.stats);

  fmt::print(
      "\nvs fp16: bytes a dense fp16 cache of every token seen would hold / bytes held.\n"
      "err: relative L2 vs the full f32 cache (about 1 or more: the outputs are unrelated).\n"
      "The weights are RANDOM: no attention sinks, no locality, nothing for a scorer to find, so\n"
      "the eviction errors above say nothing about real models (a real-model evaluation comes "
      "later).\n");
  return 0;
}
