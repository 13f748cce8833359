// tinyllm/model.hpp — a Llama (HF LlamaForCausalLM) forward pass on the CPU whose attention
// runs through a kvc cache.
//
//   auto model = tinyllm::Model::load("path/to/checkpoint");   // config.json + safetensors
//   auto cache = ...;                                           // any kvc::AnyCache with
//   kvc::SequenceId seq = cache->open_sequence();               //   model.geometry()
//   std::vector<float> logits(model.config().vocab_size);
//   model.forward_last(*cache, seq, prompt, logits);            // prefill: one chunk
//   model.forward_last(*cache, seq, {&token, 1}, logits);       // decode: one token a step
//
// Loads: <dir>/config.json (tinyllm/config.hpp) and either <dir>/model.safetensors or the
// shards named by <dir>/model.safetensors.index.json ({"weight_map": {tensor: file}}, plain
// file names in <dir>). Tensors, in HF's names and [out][in] layout, F32/F16/BF16 widened to
// fp32: model.embed_tokens.weight, model.layers.{i}.{input_layernorm,
// post_attention_layernorm}.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
// model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.norm.weight and lm_head.weight
// (not read when tie_word_embeddings: the embedding is the output head). Other tensors in
// the files are ignored. Validates: every tensor present with exactly the shape config.json
// implies, every value finite, and everything tinyllm/safetensors.hpp checks; a failure is a
// tinyllm::LoadError naming the file, the tensor and the bad value.
//
// Forward pass, exactly HF's LlamaForCausalLM in fp32 (eager attention): embedding; per
// layer x += o_proj(attention(RoPE(q_proj(rms(x))), RoPE(k_proj(rms(x))), v_proj(rms(x))))
// and x += down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x))); logits = lm_head(rms(x)).
// rms(x) = x / sqrt(mean(x²) + eps) * w in float. RoPE in HF's rotate_half convention:
// inv_freq[i] = 1 / theta^(2i/d) and angle = position · inv_freq[i] in float, as HF computes
// them; q' = q·cos + rotate_half(q)·sin with rotate_half([x1, x2]) = [−x2, x1]. GQA: the cache
// shares each kv head across num_attention_heads / num_key_value_heads query heads.
// Attention per layer: cache.append(seq, layer, k, v) with post-RoPE keys, then (chunks of
// n ≥ 2 tokens only) cache.observe(seq, layer, last min(n, observe_window()) queries), then
// cache.attend(seq, layer, q, out); the cache applies 1/sqrt(head_dim) and the causal mask,
// and whatever compression its recipe does. Q/K/V cross as strided kvc::View<const float, 3>
// over the projection outputs (no copies). A chunk of n tokens sits at positions
// tokens_seen(seq), ..., tokens_seen(seq) + n − 1 (HF does not stop at
// max_position_embeddings and neither does tinyllm).
//
// Cost: per token ≈ 2 · (parameters without the embedding) flops plus the cache's attend
// (forward_last skips lm_head for all rows but the last, and o_proj + MLP of the last layer
// for the same rows). The matmuls are Eigen (x · Wᵀ, GEMV for one decode token); scratch
// lives in a Workspace that grows to the largest chunk seen and is then reused, so steady
// decode makes no heap allocation in the model (the cache may make its own). Weights are
// fp32 in memory: 4 bytes per parameter.
//
// Errors in a call (std::invalid_argument, before anything is appended): no tokens, a token
// id outside [0, vocab_size), a logits buffer of the wrong size, a cache whose geometry is not
// geometry(), a sequence whose layers hold different lengths. kvc errors from the cache
// (kvc::SequenceError for a closed sequence, kvc::ValueError for non-finite K/V) propagate;
// if one is thrown mid-pass, the sequence is truncated back to its length before the call
// (evictions already made by earlier layers are not undone) and the error is rethrown.
//
// Threads: the overloads without a Workspace use one owned by the Model, so they must not run
// concurrently on the same Model; pass a Workspace per thread (and a cache per thread, as
// kvc requires) to share one Model.
#pragma once

#include <tinyllm/config.hpp>
#include <tinyllm/error.hpp>
#include <tinyllm/safetensors.hpp>

#include <kvc/runtime/any_cache.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tinyllm {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Scratch buffers of one forward pass. They grow to the largest chunk seen and never shrink;
// a default-constructed Workspace is empty and works with any Model.
class Workspace {
 public:
  Workspace() = default;

 private:
  friend class Model;
  using Map = Eigen::Map<RowMatrix>;

  static Map matrix(std::vector<float>& buffer, std::size_t rows, std::size_t cols) {
    if (buffer.size() < rows * cols) buffer.resize(rows * cols);
    return Map(buffer.data(), static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  }

  std::vector<float> x_, normed_, q_, k_, v_, attention_, gate_, up_, cos_, sin_;
};

class Model {
 public:
  // Loads and validates a checkpoint directory (see the top of this file). Throws LoadError.
  static Model load(const std::filesystem::path& directory) {
    Model model;
    model.config_ = Config::load(directory / "config.json");
    Checkpoint checkpoint(directory);
    model.load_weights(checkpoint);
    return model;
  }

  const Config& config() const noexcept { return config_; }

  // The shape the cache must have: one layer per decoder layer, GQA heads, head_dim.
  kvc::Geometry geometry() const noexcept {
    return {.layers = config_.num_hidden_layers,
            .q_heads = config_.num_attention_heads,
            .kv_heads = config_.num_key_value_heads,
            .head_dim = config_.head_dim};
  }

  // Parameters held (the embedding counted once when tied).
  std::size_t parameter_count() const noexcept {
    std::size_t count = static_cast<std::size_t>(embed_.size() + lm_head_.size() + norm_.size());
    for (const Layer& layer : layers_) {
      for (const RowMatrix* w : layer.matrices()) count += static_cast<std::size_t>(w->size());
      count += static_cast<std::size_t>(layer.input_norm.size() + layer.post_norm.size());
    }
    return count;
  }

  // The number of trailing queries of a multi-token chunk handed to cache.observe before
  // attend (query-aware scorers such as SnapKV score the prompt with them); 0 = never.
  // Default 64, SnapKV's default window. Single-token (decode) steps never observe.
  std::size_t observe_window() const noexcept { return observe_window_; }
  void set_observe_window(std::size_t window) noexcept { observe_window_ = window; }

  // Runs `tokens` (n ≥ 1) as one chunk of sequence `seq` and writes the logits of every
  // position to `logits` ([n][vocab_size]).
  void forward(kvc::AnyCache& cache, kvc::SequenceId seq, std::span<const int> tokens,
               Eigen::Ref<RowMatrix> logits) const {
    forward(cache, seq, tokens, logits, workspace_);
  }
  void forward(kvc::AnyCache& cache, kvc::SequenceId seq, std::span<const int> tokens,
               Eigen::Ref<RowMatrix> logits, Workspace& workspace) const {
    check_call(cache, tokens, "forward");
    if (static_cast<std::size_t>(logits.rows()) != tokens.size() ||
        static_cast<std::size_t>(logits.cols()) != config_.vocab_size) {
      fail_call("forward: logits is [{}][{}], expected [{}][{}]", logits.rows(), logits.cols(),
                tokens.size(), config_.vocab_size);
    }
    const auto normed = run(cache, seq, tokens, tokens.size(), workspace);
    logits.noalias() = normed * head().transpose();
  }

  // Same pass, but only the last position's logits ([vocab_size]) are computed: a prefill
  // chunk pays lm_head (and the last layer's o_proj + MLP) once instead of n times.
  void forward_last(kvc::AnyCache& cache, kvc::SequenceId seq, std::span<const int> tokens,
                    std::span<float> logits) const {
    forward_last(cache, seq, tokens, logits, workspace_);
  }
  void forward_last(kvc::AnyCache& cache, kvc::SequenceId seq, std::span<const int> tokens,
                    std::span<float> logits, Workspace& workspace) const {
    check_call(cache, tokens, "forward_last");
    if (logits.size() != config_.vocab_size) {
      fail_call("forward_last: logits has {} floats, expected vocab_size {}", logits.size(),
                config_.vocab_size);
    }
    const auto normed = run(cache, seq, tokens, 1, workspace);
    Eigen::Map<Eigen::RowVectorXf>(logits.data(), static_cast<Eigen::Index>(logits.size()))
        .noalias() = normed.row(0) * head().transpose();
  }

 private:
  struct Layer {
    Eigen::VectorXf input_norm, post_norm;
    RowMatrix q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;

    std::array<const RowMatrix*, 7> matrices() const {
      return {&q_proj, &k_proj, &v_proj, &o_proj, &gate_proj, &up_proj, &down_proj};
    }
  };

  // The tensors of a checkpoint directory: one file, or the shards of an index.
  class Checkpoint {
   public:
    explicit Checkpoint(const std::filesystem::path& directory) {
      const auto single = directory / "model.safetensors";
      const auto index = directory / "model.safetensors.index.json";
      if (std::filesystem::exists(single)) {
        files_.emplace("model.safetensors", SafetensorsFile(single));
        return;
      }
      if (!std::filesystem::exists(index)) {
        throw LoadError(
            fmt::format("{}: neither model.safetensors nor "
                        "model.safetensors.index.json exists",
                        directory.string()));
      }
      index_ = index.string();
      std::ifstream in(index, std::ios::binary);
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      nlohmann::json json;
      try {
        json = nlohmann::json::parse(text);
      } catch (const nlohmann::json::parse_error& e) {
        throw LoadError(index_ + ": not valid JSON: " + e.what());
      }
      const auto map = json.is_object() ? json.find("weight_map") : json.end();
      if (map == json.end() || !map->is_object()) {
        throw LoadError(index_ + ": no \"weight_map\" object");
      }
      for (const auto& [tensor, file] : map->items()) {
        const std::string name = file.is_string() ? file.get<std::string>() : std::string();
        if (name.empty() || name == "." || name == ".." ||
            name.find_first_of("/\\") != std::string::npos) {
          throw LoadError(fmt::format("{}: tensor '{}' maps to {}, not a file name in {}", index_,
                                      tensor, file.dump(), directory.string()));
        }
        if (files_.find(name) == files_.end()) {
          files_.emplace(name, SafetensorsFile(directory / name));
        }
        shard_of_.emplace(tensor, name);
      }
    }

    // The file holding `name`; LoadError if none does.
    const SafetensorsFile& file(const std::string& name) const {
      if (index_.empty()) {
        const SafetensorsFile& only = files_.begin()->second;
        only.info(name);  // throws LoadError naming the file and the tensor if absent
        return only;
      }
      const auto it = shard_of_.find(name);
      if (it == shard_of_.end()) {
        throw LoadError(fmt::format("{}: no tensor '{}' in the weight_map", index_, name));
      }
      const SafetensorsFile& shard = files_.at(it->second);
      shard.info(name);
      return shard;
    }

    // The single file, or the index: where a missing tensor was looked for.
    std::string where() const {
      return index_.empty() ? files_.begin()->second.path().string() : index_;
    }

    bool contains(const std::string& name) const {
      return index_.empty() ? files_.begin()->second.contains(name) : shard_of_.count(name) > 0;
    }

    // Tensor `name`, which must have shape `shape` and finite values, into `out`.
    void read(const std::string& name, const std::vector<std::size_t>& shape,
              std::span<float> out) const {
      const SafetensorsFile& source = file(name);
      const TensorInfo& info = source.info(name);
      if (info.shape != shape) {
        throw LoadError(fmt::format("{}: tensor '{}' has shape {}, config.json expects {}",
                                    source.path().string(), name, info.shape, shape));
      }
      source.read(name, out);
      const auto bad =
          std::find_if(out.begin(), out.end(), [](float x) { return !std::isfinite(x); });
      if (bad != out.end()) {
        throw LoadError(fmt::format("{}: tensor '{}' holds {} at flat index {}",
                                    source.path().string(), name, *bad, bad - out.begin()));
      }
    }

    RowMatrix matrix(const std::string& name, std::size_t rows, std::size_t cols) const {
      RowMatrix m(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
      read(name, {rows, cols}, std::span<float>(m.data(), rows * cols));
      return m;
    }

    Eigen::VectorXf vector(const std::string& name, std::size_t size) const {
      Eigen::VectorXf v(static_cast<Eigen::Index>(size));
      read(name, {size}, std::span<float>(v.data(), size));
      return v;
    }

   private:
    std::string index_;  // path of the index file; empty for a single model.safetensors
    std::map<std::string, SafetensorsFile> files_;
    std::map<std::string, std::string> shard_of_;
  };

  Model() = default;

  template <class... Args>
  [[noreturn]] static void fail_call(fmt::format_string<Args...> format, Args&&... args) {
    throw std::invalid_argument(fmt::format(format, std::forward<Args>(args)...));
  }

  void load_weights(const Checkpoint& checkpoint) {
    const Config& c = config_;
    const std::size_t q_width = c.num_attention_heads * c.head_dim;
    const std::size_t kv_width = c.num_key_value_heads * c.head_dim;
    embed_ = checkpoint.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
    layers_.resize(c.num_hidden_layers);
    for (std::size_t i = 0; i < c.num_hidden_layers; ++i) {
      const std::string prefix = fmt::format("model.layers.{}.", i);
      Layer& layer = layers_[i];
      layer.input_norm = checkpoint.vector(prefix + "input_layernorm.weight", c.hidden_size);
      layer.q_proj = checkpoint.matrix(prefix + "self_attn.q_proj.weight", q_width, c.hidden_size);
      layer.k_proj = checkpoint.matrix(prefix + "self_attn.k_proj.weight", kv_width, c.hidden_size);
      layer.v_proj = checkpoint.matrix(prefix + "self_attn.v_proj.weight", kv_width, c.hidden_size);
      layer.o_proj = checkpoint.matrix(prefix + "self_attn.o_proj.weight", c.hidden_size, q_width);
      layer.post_norm =
          checkpoint.vector(prefix + "post_attention_layernorm.weight", c.hidden_size);
      layer.gate_proj =
          checkpoint.matrix(prefix + "mlp.gate_proj.weight", c.intermediate_size, c.hidden_size);
      layer.up_proj =
          checkpoint.matrix(prefix + "mlp.up_proj.weight", c.intermediate_size, c.hidden_size);
      layer.down_proj =
          checkpoint.matrix(prefix + "mlp.down_proj.weight", c.hidden_size, c.intermediate_size);
    }
    norm_ = checkpoint.vector("model.norm.weight", c.hidden_size);
    if (!c.tie_word_embeddings) {
      if (!checkpoint.contains("lm_head.weight")) {
        throw LoadError(
            fmt::format("{}: no tensor 'lm_head.weight', and config.json has "
                        "tie_word_embeddings false",
                        checkpoint.where()));
      }
      lm_head_ = checkpoint.matrix("lm_head.weight", c.vocab_size, c.hidden_size);
    }
    // HF: inv_freq = 1.0 / (theta ** (arange(0, d, 2).float() / d)), in float32.
    const std::size_t half = c.head_dim / 2;
    inv_freq_.resize(half);
    for (std::size_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
      inv_freq_[i] = 1.0F / std::pow(static_cast<float>(c.rope_theta), exponent);
    }
  }

  const RowMatrix& head() const noexcept { return config_.tie_word_embeddings ? embed_ : lm_head_; }

  void check_call(const kvc::AnyCache& cache, std::span<const int> tokens,
                  const char* function) const {
    if (tokens.empty()) fail_call("{}: no tokens", function);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      if (tokens[t] < 0 || static_cast<std::size_t>(tokens[t]) >= config_.vocab_size) {
        fail_call("{}: tokens[{}] is {}, outside the vocabulary [0, {})", function, t, tokens[t],
                  config_.vocab_size);
      }
    }
    const kvc::Geometry& g = cache.geometry();
    if (g != geometry()) {
      fail_call(
          "{}: the cache has {} layers, {} query / {} kv heads, head_dim {}; the model has "
          "{}, {} / {}, {}",
          function, g.layers, g.q_heads, g.kv_heads, g.head_dim, config_.num_hidden_layers,
          config_.num_attention_heads, config_.num_key_value_heads, config_.head_dim);
    }
  }

  // x · rsqrt(mean(x²) + eps) · w per row, in float (HF LlamaRMSNorm).
  void rms_norm(const Eigen::Map<RowMatrix>& x, const Eigen::VectorXf& w,
                Eigen::Map<RowMatrix> out) const {
    const float eps = static_cast<float>(config_.rms_norm_eps);
    const float inverse_width = 1.0F / static_cast<float>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const float scale = 1.0F / std::sqrt(x.row(t).squaredNorm() * inverse_width + eps);
      out.row(t) = (x.row(t) * scale).cwiseProduct(w.transpose());
    }
  }

  // Rotates every head of `m` ([n][heads · head_dim]) in place, position t's cos/sin rows.
  void rope(Eigen::Map<RowMatrix> m, const Eigen::Map<RowMatrix>& cos,
            const Eigen::Map<RowMatrix>& sin) const {
    const std::size_t d = config_.head_dim, half = d / 2;
    const std::size_t heads = static_cast<std::size_t>(m.cols()) / d;
    for (Eigen::Index t = 0; t < m.rows(); ++t) {
      const float* c = &cos(t, 0);
      const float* s = &sin(t, 0);
      for (std::size_t h = 0; h < heads; ++h) {
        float* x = &m(t, static_cast<Eigen::Index>(h * d));
        for (std::size_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
    }
  }

  // A [heads][n][head_dim] view of a [n][heads · head_dim] row-major projection output.
  template <class T>
  kvc::View<T, 3> heads_view(T* data, std::size_t n, std::size_t heads) const {
    const auto d = static_cast<std::ptrdiff_t>(config_.head_dim);
    return kvc::View<T, 3>(data, {heads, n, config_.head_dim},
                           {d, d * static_cast<std::ptrdiff_t>(heads), 1});
  }

  // The decoder stack on `tokens`; returns the final-normed hidden states of the last
  // `rows_out` positions ([rows_out][hidden], in the workspace).
  Eigen::Map<RowMatrix> run(kvc::AnyCache& cache, kvc::SequenceId seq, std::span<const int> tokens,
                            std::size_t rows_out, Workspace& ws) const {
    const std::size_t start = cache.tokens_seen(seq, 0);
    for (std::size_t l = 1; l < config_.num_hidden_layers; ++l) {
      if (cache.tokens_seen(seq, l) != start) {
        fail_call("forward: layer {} of the sequence has seen {} tokens, layer 0 has seen {}", l,
                  cache.tokens_seen(seq, l), start);
      }
    }
    try {
      return run_layers(cache, seq, tokens, start, rows_out, ws);
    } catch (...) {
      if (cache.is_open(seq)) cache.truncate(seq, start);
      throw;
    }
  }

  Eigen::Map<RowMatrix> run_layers(kvc::AnyCache& cache, kvc::SequenceId seq,
                                   std::span<const int> tokens, std::size_t start,
                                   std::size_t rows_out, Workspace& ws) const {
    const Config& c = config_;
    const std::size_t n = tokens.size();
    const std::size_t q_heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
    const std::size_t half = c.head_dim / 2;

    auto x = Workspace::matrix(ws.x_, n, c.hidden_size);
    auto normed = Workspace::matrix(ws.normed_, n, c.hidden_size);
    auto q = Workspace::matrix(ws.q_, n, q_heads * c.head_dim);
    auto k = Workspace::matrix(ws.k_, n, kv_heads * c.head_dim);
    auto v = Workspace::matrix(ws.v_, n, kv_heads * c.head_dim);
    auto attention = Workspace::matrix(ws.attention_, n, q_heads * c.head_dim);
    auto gate = Workspace::matrix(ws.gate_, n, c.intermediate_size);
    auto up = Workspace::matrix(ws.up_, n, c.intermediate_size);
    auto cos = Workspace::matrix(ws.cos_, n, half);
    auto sin = Workspace::matrix(ws.sin_, n, half);

    for (std::size_t t = 0; t < n; ++t) {
      x.row(static_cast<Eigen::Index>(t)) = embed_.row(tokens[t]);
      const auto position = static_cast<float>(start + t);
      for (std::size_t i = 0; i < half; ++i) {
        const float angle = position * inv_freq_[i];
        cos(static_cast<Eigen::Index>(t), static_cast<Eigen::Index>(i)) = std::cos(angle);
        sin(static_cast<Eigen::Index>(t), static_cast<Eigen::Index>(i)) = std::sin(angle);
      }
    }
    const std::size_t observed = n >= 2 ? std::min(n, observe_window_) : 0;

    for (std::size_t l = 0; l < c.num_hidden_layers; ++l) {
      const Layer& w = layers_[l];
      rms_norm(x, w.input_norm, normed);
      q.noalias() = normed * w.q_proj.transpose();
      k.noalias() = normed * w.k_proj.transpose();
      v.noalias() = normed * w.v_proj.transpose();
      rope(q, cos, sin);
      rope(k, cos, sin);
      cache.append(seq, l, heads_view<const float>(k.data(), n, kv_heads),
                   heads_view<const float>(v.data(), n, kv_heads));
      if (observed > 0) {
        const float* window = q.data() + (n - observed) * q_heads * c.head_dim;
        cache.observe(seq, l, heads_view<const float>(window, observed, q_heads));
      }
      cache.attend(seq, l, heads_view<const float>(q.data(), n, q_heads),
                   heads_view<float>(attention.data(), n, q_heads));

      // Rows whose output is still needed: all of them, except in the last layer, where only
      // the `rows_out` positions whose logits are asked for matter.
      const std::size_t first = l + 1 == c.num_hidden_layers ? n - rows_out : 0;
      const auto rows = static_cast<Eigen::Index>(n - first);
      const auto from = static_cast<Eigen::Index>(first);
      auto x_rows = x.middleRows(from, rows);
      x_rows.noalias() += attention.middleRows(from, rows) * w.o_proj.transpose();
      auto x_tail = Eigen::Map<RowMatrix>(x_rows.data(), rows, x.cols());
      auto normed_tail = Eigen::Map<RowMatrix>(normed.data(), rows, normed.cols());
      rms_norm(x_tail, w.post_norm, normed_tail);
      auto gate_rows = gate.topRows(rows);
      auto up_rows = up.topRows(rows);
      gate_rows.noalias() = normed_tail * w.gate_proj.transpose();
      up_rows.noalias() = normed_tail * w.up_proj.transpose();
      gate_rows.array() = gate_rows.array() / (1.0F + (-gate_rows.array()).exp()) * up_rows.array();
      x_rows.noalias() += gate_rows * w.down_proj.transpose();
    }

    const auto rows = static_cast<Eigen::Index>(rows_out);
    auto x_tail = Eigen::Map<RowMatrix>(x.data() + (n - rows_out) * c.hidden_size, rows, x.cols());
    auto out = Eigen::Map<RowMatrix>(normed.data(), rows, normed.cols());
    rms_norm(x_tail, norm_, out);
    return out;
  }

  Config config_;
  RowMatrix embed_;    // [vocab][hidden]
  RowMatrix lm_head_;  // [vocab][hidden]; empty when tied (head() is embed_)
  Eigen::VectorXf norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  std::size_t observe_window_ = 64;
  mutable Workspace workspace_;
};

}  // namespace tinyllm
