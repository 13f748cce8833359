// kvc/core/page_pool.hpp — fixed-size pages with reference counts, for ragged KV storage.
//
// Every (sequence, layer, kv head) owns a list of page ids; a page holds `page_tokens`
// tokens of one head. Pages come from slabs allocated through the compute backend and go
// back to a free list, so eviction and close() return memory to the pool at once and
// reuse costs no allocation. Reference counts implement copy-on-write fork(): a shared
// page is copied before its first write.
#pragma once

#include <kvc/core/concepts.hpp>
#include <kvc/core/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace kvc {

using PageId = std::uint32_t;

template <ComputeBackend Backend>
class PagePool {
 public:
  static constexpr std::size_t pages_per_slab = 64;

  PagePool(std::size_t page_bytes, Backend backend = {})
      : page_bytes_(page_bytes), backend_(std::move(backend)) {}

  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;
  ~PagePool() {
    for (std::byte* slab : slabs_) backend_.deallocate(slab, slab_bytes());
  }

  std::size_t page_bytes() const noexcept { return page_bytes_; }
  std::size_t pages_in_use() const noexcept { return in_use_; }
  std::size_t pages_reserved() const noexcept { return slabs_.size() * pages_per_slab; }
  std::size_t bytes_reserved() const noexcept { return slabs_.size() * slab_bytes(); }

  // Makes sure `count` more pages can be acquired without allocating (so a caller can
  // reserve first and then mutate without a throw in between).
  void reserve(std::size_t count) {
    while (free_.size() < count) grow();
  }

  PageId acquire() {
    if (free_.empty()) grow();
    const PageId id = free_.back();
    free_.pop_back();
    references_[id] = 1;
    ++in_use_;
    return id;
  }

  void retain(PageId id) noexcept { ++references_[id]; }

  void release(PageId id) noexcept {
    if (--references_[id] == 0) {
      free_.push_back(id);  // capacity reserved in grow(): never throws
      --in_use_;
    }
  }

  bool shared(PageId id) const noexcept { return references_[id] > 1; }
  std::uint32_t references(PageId id) const noexcept { return references_[id]; }

  std::byte* data(PageId id) noexcept {
    return slabs_[id / pages_per_slab] + (id % pages_per_slab) * page_bytes_;
  }
  const std::byte* data(PageId id) const noexcept {
    return slabs_[id / pages_per_slab] + (id % pages_per_slab) * page_bytes_;
  }

  // Copy-on-write: returns a page the caller may write, copying `id` if it is shared.
  // Needs one free page reserved when `id` is shared.
  PageId make_unique(PageId id) {
    if (!shared(id)) return id;
    const PageId copy = acquire();
    std::memcpy(data(copy), data(id), page_bytes_);
    release(id);
    return copy;
  }

 private:
  std::size_t slab_bytes() const noexcept { return page_bytes_ * pages_per_slab; }

  void grow() {
    const std::size_t first = slabs_.size() * pages_per_slab;
    // Reserve bookkeeping first so that release() never allocates.
    references_.reserve(first + pages_per_slab);
    free_.reserve(first + pages_per_slab);
    slabs_.reserve(slabs_.size() + 1);
    std::byte* slab = backend_.allocate(slab_bytes());
    slabs_.push_back(slab);
    references_.resize(first + pages_per_slab, 0);
    for (std::size_t i = pages_per_slab; i-- > 0;) free_.push_back(static_cast<PageId>(first + i));
  }

  std::size_t page_bytes_;
  [[no_unique_address]] Backend backend_;
  std::vector<std::byte*> slabs_;
  std::vector<std::uint32_t> references_;
  std::vector<PageId> free_;
  std::size_t in_use_ = 0;
};

}  // namespace kvc
