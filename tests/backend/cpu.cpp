// Tests of kvc/backend/cpu.hpp: aligned host allocations.
#include <kvc/backend/cpu.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>

TEST_CASE("backend::Cpu allocates 64-byte aligned writable memory", "[backend]") {
  kvc::backend::Cpu cpu;
  for (std::size_t bytes : {1, 64, 1000, 1 << 20}) {
    std::byte* memory = cpu.allocate(bytes);
    CHECK(reinterpret_cast<std::uintptr_t>(memory) % 64 == 0);
    std::memset(memory, 0xAB, bytes);
    CHECK(memory[bytes - 1] == std::byte{0xAB});
    cpu.deallocate(memory, bytes);
  }
}
