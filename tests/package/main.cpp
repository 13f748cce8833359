// Consumer of the installed kvc package (see CMakeLists.txt here and cmake/package_test.cmake).
#include <kvc/kvc.hpp>

#include <cstdio>

int main() {
  kvc::KvCache<> cache({.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64});
  if (cache.geometry().head_dim != 64 || cache.geometry().group_size() != 2) {
    std::puts("kvc package test: FAILED (unexpected geometry)");
    return 1;
  }
  std::printf("kvc package test: OK (kvc %d.%d.%d)\n", kvc::version_major, kvc::version_minor,
              kvc::version_patch);
  return 0;
}
