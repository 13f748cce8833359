// kvc/runtime/any_cache.hpp — a KvCache behind a small virtual interface.
//
// KvCache<...> is a compile-time composition; tools and engines that pick the composition
// from a config string at run time (kvc-eval, a serving config) hold an AnyCache instead.
// One virtual call per (layer, step) is noise next to the attend it forwards to. Host tensors
// are fp32 (the common case of a CPU host loop); the concrete KvCache stays reachable through
// `CacheModel<Cache>::cache()` for anything the interface does not expose.
#pragma once

#include <kvc/core/kv_cache.hpp>

#include <memory>
#include <string>
#include <utility>

namespace kvc {

class AnyCache {
 public:
  virtual ~AnyCache() = default;

  // The recipe this cache was built from (e.g. "h2o:budget=0.25+int8"), or "" if none.
  virtual const std::string& recipe() const noexcept = 0;
  virtual const Geometry& geometry() const noexcept = 0;
  virtual const CacheOptions& options() const noexcept = 0;

  virtual SequenceId open_sequence() = 0;
  virtual SequenceId fork(SequenceId parent) = 0;
  virtual void close(SequenceId id) = 0;
  virtual bool is_open(SequenceId id) const noexcept = 0;

  // Same contracts as KvCache: k, v [kv_heads][n][head_dim]; q, out [q_heads][n][head_dim].
  virtual void append(SequenceId id, std::size_t layer, View<const float, 3> k,
                      View<const float, 3> v) = 0;
  virtual void observe(SequenceId id, std::size_t layer, View<const float, 3> q_window) = 0;
  virtual void attend(SequenceId id, std::size_t layer, View<const float, 3> q,
                      View<float, 3> out) = 0;
  virtual void compress(SequenceId id) = 0;
  virtual void truncate(SequenceId id, std::size_t length) = 0;

  virtual std::size_t tokens(SequenceId id, std::size_t layer, std::size_t kv_head) const = 0;
  virtual std::size_t tokens_seen(SequenceId id, std::size_t layer) const = 0;
  virtual CacheStats stats() const = 0;
  virtual CacheStats stats(SequenceId id) const = 0;

 protected:
  AnyCache() = default;
  AnyCache(const AnyCache&) = default;
  AnyCache& operator=(const AnyCache&) = default;
};

// The one implementation of AnyCache: forwards every call to a KvCache<...> it owns.
template <class Cache>
class CacheModel final : public AnyCache {
 public:
  template <class... Args>
  explicit CacheModel(std::string recipe, Args&&... args)
      : recipe_(std::move(recipe)), cache_(std::forward<Args>(args)...) {}

  Cache& cache() noexcept { return cache_; }
  const Cache& cache() const noexcept { return cache_; }

  const std::string& recipe() const noexcept override { return recipe_; }
  const Geometry& geometry() const noexcept override { return cache_.geometry(); }
  const CacheOptions& options() const noexcept override { return cache_.options(); }

  SequenceId open_sequence() override { return cache_.open_sequence(); }
  SequenceId fork(SequenceId parent) override { return cache_.fork(parent); }
  void close(SequenceId id) override { cache_.close(id); }
  bool is_open(SequenceId id) const noexcept override { return cache_.is_open(id); }

  void append(SequenceId id, std::size_t layer, View<const float, 3> k,
              View<const float, 3> v) override {
    cache_.append(id, layer, k, v);
  }
  void observe(SequenceId id, std::size_t layer, View<const float, 3> q_window) override {
    cache_.observe(id, layer, q_window);
  }
  void attend(SequenceId id, std::size_t layer, View<const float, 3> q,
              View<float, 3> out) override {
    cache_.attend(id, layer, q, out);
  }
  void compress(SequenceId id) override { cache_.compress(id); }
  void truncate(SequenceId id, std::size_t length) override { cache_.truncate(id, length); }

  std::size_t tokens(SequenceId id, std::size_t layer, std::size_t kv_head) const override {
    return cache_.tokens(id, layer, kv_head);
  }
  std::size_t tokens_seen(SequenceId id, std::size_t layer) const override {
    return cache_.tokens_seen(id, layer);
  }
  CacheStats stats() const override { return cache_.stats(); }
  CacheStats stats(SequenceId id) const override { return cache_.stats(id); }

 private:
  std::string recipe_;
  Cache cache_;
};

}  // namespace kvc
