// Tests of kvc/core/page_pool.hpp: reuse, reference counts, copy-on-write, alignment.
#include <kvc/core/page_pool.hpp>

#include <kvc/backend/cpu.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <set>

TEST_CASE("PagePool hands out distinct aligned pages and reuses released ones", "[page_pool]") {
  kvc::PagePool<kvc::backend::Cpu> pool(192);
  std::set<kvc::PageId> ids;
  for (int i = 0; i < 150; ++i) {
    const kvc::PageId id = pool.acquire();
    CHECK(ids.insert(id).second);
    CHECK(reinterpret_cast<std::uintptr_t>(pool.data(id)) % 64 == 0);
    std::memset(pool.data(id), i, pool.page_bytes());  // ASan: every byte of a page is ours
  }
  CHECK(pool.pages_in_use() == 150);
  CHECK(pool.pages_reserved() == 3 * kvc::PagePool<kvc::backend::Cpu>::pages_per_slab);
  for (kvc::PageId id : ids) pool.release(id);
  CHECK(pool.pages_in_use() == 0);
  const std::size_t reserved = pool.bytes_reserved();
  for (int i = 0; i < 150; ++i) (void)pool.acquire();
  CHECK(pool.bytes_reserved() == reserved);  // no new slab: free pages were reused
}

TEST_CASE("PagePool reference counts drive copy-on-write", "[page_pool]") {
  kvc::PagePool<kvc::backend::Cpu> pool(64);
  const kvc::PageId page = pool.acquire();
  std::memset(pool.data(page), 7, 64);
  CHECK(pool.make_unique(page) == page);  // sole owner writes in place
  pool.retain(page);
  CHECK(pool.shared(page));
  const kvc::PageId copy = pool.make_unique(page);
  CHECK(copy != page);
  CHECK(std::memcmp(pool.data(copy), pool.data(page), 64) == 0);
  CHECK(!pool.shared(page));
  CHECK(pool.references(page) == 1);
  CHECK(pool.pages_in_use() == 2);
  pool.release(page);
  pool.release(copy);
  CHECK(pool.pages_in_use() == 0);
}

TEST_CASE("PagePool::reserve guarantees acquisitions without growth", "[page_pool]") {
  kvc::PagePool<kvc::backend::Cpu> pool(64);
  pool.reserve(100);
  const std::size_t reserved = pool.bytes_reserved();
  CHECK(pool.pages_reserved() >= 100);
  for (int i = 0; i < 100; ++i) (void)pool.acquire();
  CHECK(pool.bytes_reserved() == reserved);
}
